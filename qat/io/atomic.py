"""Atomic writes: every file and folder distqat writes appears whole or not at all.

Each writer works on a temp path beside its destination (same file system) and renames it into place at
the end, so a crash, a kill or a concurrent rank never leaves half a file behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, Path]


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """No room for a write: the message names the path, the bytes needed and free, and says what stayed intact."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.strerror)


def free_bytes(path: PathLike) -> int:
    """Free bytes (for this user) on the file system that holds `path`, or would hold it once created."""
    path = Path(path).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    return shutil.disk_usage(existing).free


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# What a write may leave free, beyond its own bytes: a full disk also breaks the logs and the next checkpoint.
HEADROOM = 16 << 20


def ensure_space(path: PathLike, need: int, what: str) -> None:
    """Refuse, before writing, a write of `need` bytes to `path` that the file system cannot hold."""
    free = free_bytes(path)
    if need + HEADROOM > free:
        raise DiskFull(f"{path}: {what} needs {_size(need)} and {_size(free)} is free there; free space or write "
                       "elsewhere (nothing was written)")


def _written(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def no_space(e: BaseException) -> bool:
    """A full disk or quota: an OSError, or safetensors' own error for one ("... (os error 28)")."""
    if isinstance(e, OSError):
        return e.errno in NO_SPACE
    return type(e).__name__ == "SafetensorError" and any(f"(os error {c})" in str(e) for c in NO_SPACE)


def disk_full(e: BaseException, dest: Path, tmp: Path, need: Optional[int] = None) -> Optional[DiskFull]:
    """The one-line DiskFull for an error that is a full disk or quota (None for any other error), measured
    before the temp path goes."""
    # torch.save's writer reports a full disk as a RuntimeError of its own ("... unexpected pos ..."): read as one
    # when the disk has no room left indeed.
    torch_full = isinstance(e, RuntimeError) and "unexpected pos" in str(e) and free_bytes(dest) < HEADROOM
    if isinstance(e, DiskFull) or not (no_space(e) or torch_full):
        return None
    written = _written(tmp)
    needs = f"{_size(need)} needed, " if need else f"{_size(written)} written when it ran out, "
    kept = f"the {dest.name} already there is unchanged" if dest.exists() else "nothing was left half-written"
    return DiskFull(f"{dest}: no space left on the device ({needs}{_size(free_bytes(dest))} free); free space or "
                    f"write elsewhere; {kept}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def temp_beside(path: Path) -> Path:
    """A new empty temp file beside `path`, with its suffix, named as clean_stale recognises, with the mode a plain
    open() would have given: mkstemp makes its files private (0600), and on a shared cluster the team reads each
    other's results (umask taken once at import: os.umask can only be read by setting it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return Path(tmp)


@contextmanager
def atomic_file(path: PathLike, need: Optional[int] = None) -> Iterator[Path]:
    """A temp path beside `path`, with its suffix (writers that pick a format by extension see the right one);
    renamed onto `path` when the block ends without error, removed otherwise. `need` (bytes), when known, is
    checked against the free space first; a full disk midway is a DiskFull naming the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if need is not None:
        ensure_space(path.parent, need, f"writing {path.name}")
    tmp = temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        full = disk_full(e, path, tmp, need)
        if full is None:
            raise
        raise full from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def atomic_dir(path: PathLike, replace: bool = True, need: Optional[int] = None) -> Iterator[Path]:
    """A temp folder beside `path` that becomes `path` when the block ends without error.

    An existing `path` is removed first (replace=True), or kept and the new folder dropped (replace=False: a
    cache that another process finished first). On error the temp folder is removed. `need` (bytes), when known,
    is checked against the free space first; a full disk midway is a DiskFull naming the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if need is not None:
        ensure_space(path.parent, need, f"writing {path.name}")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is meant to be readable like any folder
        try:
            yield tmp
        except Exception as e:
            full = disk_full(e, path, tmp, need)
            if full is None:
                raise
            raise full from e
        if path.exists():
            if not replace:
                return
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if replace or not path.exists():
                raise  # not a concurrent writer's finished copy: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_dir(path: PathLike, what: str) -> Path:
    """That the folder `what` names (a config key) exists or can be created, and can be written to; a
    ValueError naming the key and the reason otherwise. Creates nothing: a run that fails before its first
    write leaves no folder behind."""
    path = Path(path)
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise ValueError(f"{what}={str(path)!r} cannot be a folder: {existing} is a file; choose another {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}={str(path)!r} cannot be written: {existing} is not writable; choose another "
                         f"{what}")
    return path


TEMP_DIR = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]{8}$")  # what atomic_dir leaves when killed
TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}(\.[A-Za-z0-9]+)?$")  # and atomic_file (mkstemp's 8 characters)


def clean_stale(folder: PathLike) -> list[Path]:
    """Remove the temp folders and files a killed writer left directly in `folder`; returns what went.
    Call it only where no other process is writing into `folder` at the same time."""
    folder = Path(folder)
    gone = []
    for p in folder.iterdir() if folder.is_dir() else []:
        if p.is_dir() and TEMP_DIR.match(p.name):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
        elif p.is_file() and TEMP_FILE.match(p.name) and not p.name.startswith((".git", ".env")):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone

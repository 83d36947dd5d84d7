"""Atomic writes: every file and folder distqat writes appears whole or not at all.

Each writer works on a temp path beside its destination (same file system) and renames it into place at
the end, so a crash, a kill or a concurrent rank never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, Path]


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """A temp path beside `path`, with its suffix (writers that pick a format by extension see the right one);
    renamed onto `path` when the block ends without error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
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
def atomic_dir(path: PathLike, replace: bool = True) -> Iterator[Path]:
    """A temp folder beside `path` that becomes `path` when the block ends without error.

    An existing `path` is removed first (replace=True), or kept and the new folder dropped (replace=False: a
    cache that another process finished first). On error the temp folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is meant to be readable like any folder
        yield tmp
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

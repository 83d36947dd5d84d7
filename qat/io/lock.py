"""One run per output folder: a resubmitted job that starts while the first still runs is refused in one line,
instead of both writing the same checkpoints and results.

The lock is a file in the folder, created exclusively (O_EXCL, atomic on local and NFSv3+ file systems), holding who
took it: host, pid, the process's start time (so a recycled pid is not taken for the holder), the command. The
holder touches it every `beat_s` seconds. A lock is stale, and is taken over, when its holder is on this host and
gone, or when it was not touched for `stale_s` seconds (a holder on another node that died, or a lost node).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

from .atomic import NO_SPACE, DiskFull

LOCK_FILE = ".distqat.lock"


class FolderLocked(OSError):
    """Another live run holds the folder: the message names it and the way out (an OSError: exit 2, like the
    other refusals of a folder)."""


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux /proc), None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name's closing parenthesis


def _alive(pid: int, started: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    now = _start_time(pid)
    return started is None or now is None or now == started


def _me(command: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
            "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


class FolderLock:
    """`with FolderLock(folder, "train"):` holds the folder for this process. Re-entrant within a process (the
    pipeline's steps share its lock); the folder is created for the lock and removed again if it stayed empty."""

    _held: dict[Path, FolderLock] = {}

    def __init__(self, folder: Union[str, Path], command: str, name: str = LOCK_FILE, beat_s: float = 30.0,
                 stale_s: float = 600.0) -> None:
        self.folder = Path(folder).absolute()
        self.path = self.folder / name
        self.command = command
        self.beat_s, self.stale_s = beat_s, stale_s
        self._depth = 0
        self._created = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> FolderLock:
        held = FolderLock._held.get(self.path)
        if held is not None:
            held._depth += 1
            self._outer = held
            return self
        self._outer = None
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed, then ours created; another taker may win that race
            if self._create():
                break
            self._take_over_if_stale()
        else:
            raise FolderLocked(f"{self.folder} is locked by a run that keeps taking it ({self.path})")
        self._depth = 1
        FolderLock._held[self.path] = self
        self._thread = threading.Thread(target=self._beat, name="distqat-lock", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._outer is not None:
            self._outer._depth -= 1
            return
        self._stop.set()
        FolderLock._held.pop(self.path, None)
        try:
            holder = self._holder()
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()  # still ours: not taken over as stale meanwhile
        except (OSError, ValueError):
            pass
        if self._created:
            try:
                self.folder.rmdir()  # only if the run wrote nothing there
            except OSError:
                pass

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(_me(self.command), f)
        except BaseException as e:
            self.path.unlink(missing_ok=True)  # an empty lock would hold the folder from the next run
            if self._created:
                try:
                    self.folder.rmdir()
                except OSError:
                    pass
            if isinstance(e, OSError) and e.errno in NO_SPACE:
                raise DiskFull(f"{self.path}: no space left on the device for the run's lock; free space or write "
                               "elsewhere") from e
            raise
        return True

    def _holder(self) -> dict[str, Any]:
        return json.loads(self.path.read_text())

    def _take_over_if_stale(self) -> None:
        try:
            holder = self._holder()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            holder, age = {}, time.time() - self.path.stat().st_mtime  # half-written by a killed taker
        here = holder.get("host") == socket.gethostname()
        gone = here and not _alive(int(holder.get("pid", -1)), holder.get("started"))
        if gone or age > self.stale_s or (not holder and age > 5):
            self.path.unlink(missing_ok=True)
            return
        who = f"{holder.get('command', '?')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since " \
              f"{holder.get('since', '?')})"
        fix = "wait for it, stop it, or choose another output folder" if here else \
            f"if that run is gone, delete {self.path} (or wait {self.stale_s - age:.0f} s: a lock untouched for " \
            f"{self.stale_s:.0f} s is stale)"
        raise FolderLocked(f"{self.folder} is in use by another run: {who}; {fix}")

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

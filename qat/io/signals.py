"""Stop signals: what a cluster sends before it takes the machine back (SLURM's --signal, Kubernetes' TERM), turned
into an orderly stop with its own exit code, so a job script can tell "preempted, resubmit" from a failure.

`train` finishes its step and checkpoints first (trainer/faults.py); the other commands raise `Stopped` where the
signal lands, and the atomic writers (qat/io/atomic.py) remove their temp paths on the way out, so what they had
finished (generate's shards, a written model folder) stays and nothing half-written does.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

# Exit codes a job script can act on (docs/ARCHITECTURE.md, "Reliability"): 75 is sysexits' EX_TEMPFAIL, "try
# again later": the run stopped in order and a rerun continues it. 76: another rank of the run died.
EXIT_STOPPED = 75
EXIT_RANK_LOST = 76
DEFAULT_SIGNALS = ("TERM", "USR1")


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way
    swallows it; `detail` says what was kept (a checkpoint, finished shards)."""

    def __init__(self, signame: str, detail: str = "") -> None:
        super().__init__(signame, detail)
        self.signame = signame
        self.detail = detail

    def __str__(self) -> str:
        return f"stopped by SIG{self.signame}" + (f"; {self.detail}" if self.detail else "")


def signal_number(name: str) -> int:
    """TERM, SIGTERM or 15 -> 15; a ValueError naming the allowed forms otherwise."""
    text = str(name).upper().removeprefix("SIG")
    if text.isdigit():
        return int(text)
    try:
        return int(getattr(signal, f"SIG{text}"))
    except AttributeError:
        raise ValueError(f"{name!r} is not a signal name; use e.g. TERM or USR1") from None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name.removeprefix("SIG")


_active: list[list[int]] = []  # the signals of the stop_on_signals blocks now open, innermost last


@contextmanager
def stop_on_signals(names: Sequence[str] = DEFAULT_SIGNALS) -> Iterator[None]:
    """Within the block, each of the signals raises `Stopped` in the main thread (their earlier handlers come back
    after). Outside the main thread, where Python cannot take signals, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Stopped(signal_name(signum))

    numbers = [signal_number(n) for n in names]
    before = {n: signal.signal(n, handler) for n in numbers}
    _active.append(numbers)
    try:
        yield
    finally:
        _active.pop()
        for n, h in before.items():
            signal.signal(n, h)


class Deferred:
    """What `stop_at_boundaries` yields: `signame` once a stop signal arrived (None before)."""

    signame: Optional[str] = None


@contextmanager
def stop_at_boundaries() -> Iterator[Deferred]:
    """Within the block, the stop signals of the enclosing `stop_on_signals` are recorded instead of raised, so
    the work under way (a PTQ block) finishes and can be kept; the caller checks `signame` between pieces and
    raises `Stopped` itself. With no enclosing block (a library caller), nothing is installed."""
    deferred = Deferred()
    if not _active or threading.current_thread() is not threading.main_thread():
        yield deferred
        return

    def handler(signum: int, frame: Any) -> None:
        deferred.signame = signal_name(signum)

    before = {n: signal.signal(n, handler) for n in _active[-1]}
    try:
        yield deferred
    finally:
        for n, h in before.items():
            signal.signal(n, h)


def record_exit(code: int, rank: Optional[int] = None) -> None:
    """Where launch.sh asked for it ($DISTQAT_EXIT_DIR), this rank's exit code as <dir>/rank<r>.code: torchrun and
    srun report a failed worker as their own exit 1, and the script returns the ranks' code (75: stopped) instead."""
    folder = os.environ.get("DISTQAT_EXIT_DIR")
    if not folder:
        return
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    try:
        path = Path(folder) / f"rank{rank}.code"
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(f"{code}\n")
        os.replace(tmp, path)
    except OSError:
        pass  # the code still reaches the caller as this process's own exit status

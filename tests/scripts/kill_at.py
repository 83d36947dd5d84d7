"""A command that dies at a chosen point: `python kill_at.py TARGET [--call N] [--when before|after]
[--match TEXT] [--signal KILL|TERM|...] -- <distqat command and arguments>`.

TARGET is `module:qualname` (`qat.export.convert:save_file`, `lightning.pytorch.callbacks:ModelCheckpoint.
_save_checkpoint`): the name as the code that calls it looks it up. Its Nth call (default the first) sends the
signal to this very process, before the original runs (--when before) or once it has returned (after, the default).
With --match, only the calls whose arguments' repr holds TEXT count (`os:replace --match shard-00001`: the rename of
that shard, whoever else renames files). SIGKILL is a real kill -9: the process ends there, files half-written stay
as they are. A stop signal (TERM, USR1) goes through the command's own handler, as a cluster's would. The command
runs in this process as `python -m trainer` runs it; the exit code is its own.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def resolve(target: str) -> tuple[object, str]:
    """(the object holding the name, the name) for `module:qualname`."""
    module, _, qualname = target.partition(":")
    if not qualname:
        raise SystemExit(f"kill_at: {target!r} is not module:qualname")
    owner: object = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    if not hasattr(owner, name):
        raise SystemExit(f"kill_at: {module} has no {qualname}")
    return owner, name


def arm(target: str, call: int, when: str, signum: int, match: str = "") -> None:
    """Replace TARGET by a wrapper that signals this process at its `call`th call (of those matching `match`)."""
    owner, name = resolve(target)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal calls
        if match and match not in repr((args, kwargs)):
            return original(*args, **kwargs)
        calls += 1
        hit = calls == call
        if hit and when == "before":
            os.kill(os.getpid(), signum)
        result = original(*args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), signum)
        return result

    if isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod):
        wrapper = staticmethod(wrapper)
    setattr(owner, name, wrapper)


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="kill_at")
    parser.add_argument("target")
    parser.add_argument("--call", type=int, default=1)
    parser.add_argument("--when", choices=("before", "after"), default="after")
    parser.add_argument("--match", default="")
    parser.add_argument("--signal", default="KILL")
    args = parser.parse_args(argv[:split])
    signum = int(getattr(signal, "SIG" + args.signal.upper().removeprefix("SIG")))
    arm(args.target, args.call, args.when, signum, args.match)
    from trainer.cli import main as distqat  # after arming: nothing of the command has run yet

    sys.argv = [sys.argv[0], *argv[split + 1:]]
    return distqat(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())

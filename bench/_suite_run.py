"""How bench/suite.py runs one part: a subprocess in its own process group under the part's time limit, its output
in <part>.log, and a record of what happened (a part that overruns is stopped and recorded as timeout, one that
crashes as failed); and the machine's description every record carries."""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import shutil
import signal
import subprocess
import time

from bench._suite_parts import BUILDERS, ROOT, Skip

STOP_GRACE_S = 5


def run_part(name: str, ctx, limit: float) -> dict:
    rec = {"part": name, "status": "skipped", "reason": None, "budget_s": limit, "wall_s": 0.0}
    try:
        if name != "model" and not ctx.smoke and not ctx.gpu:
            raise Skip("no CUDA GPU here (nvidia-smi lists none); --cpu-smoke runs every part's code path on CPU")
        cmd, env, parse = BUILDERS[name](ctx)
    except Skip as e:
        rec["reason"] = str(e)
        return rec
    if cmd is None:  # nothing to run (e.g. the model folder is there already)
        return {**rec, "status": "ok", **parse(rec)}
    log = ctx.out / f"{name}.log"
    rec.update(command=" ".join(map(str, cmd)), log=log.name)
    t0 = time.perf_counter()
    with log.open("w") as f:
        # Its own process group: a timeout stops its children too.
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**ctx.env, **env},
                                start_new_session=True)
        try:
            rec["returncode"] = proc.wait(timeout=limit)
            rec["status"] = "ok" if rec["returncode"] == 0 else "failed"
        except subprocess.TimeoutExpired:
            rec["status"], rec["reason"] = "timeout", f"stopped at its limit of {limit:.0f} s"
            stop(proc)
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    if rec["status"] != "ok":
        rec["reason"] = rec["reason"] or f"exit code {rec['returncode']}"
        rec["log_tail"] = log.read_text(errors="replace")[-2000:]
    try:  # what a stopped or failed part measured before it ended still counts
        rec.update(parse(rec))
    except Exception as e:  # noqa: BLE001 - a half-written result must not stop the suite
        rec["parse_error"] = f"{type(e).__name__}: {e}"
    return rec


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (its children too), SIGKILL to what is left after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)


def environment(smoke: bool) -> dict:
    versions = {}
    for pkg in ("torch", "triton", "transformers", "lightning", "deepspeed", "peft"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[pkg] = importlib.metadata.version(pkg)
    gpu = None
    if not smoke and shutil.which("nvidia-smi"):
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                           text=True)
        gpu = r.stdout.strip() or None
    return {"date": datetime.date.today().isoformat(), "device": gpu or "cpu", "smoke": smoke, "versions": versions}

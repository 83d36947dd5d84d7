"""Every GPU figure docs/BENCHMARKS.md still lacks, measured by one command (bench/gpu_suite.sh wraps it).

    python -m bench.suite --out DIR [--model /root/stash/model.gguf|HF folder] [--budget part=seconds ...]
                          [--parts a,b] [--total 480] [--cpu-smoke]

Parts, in this order, each a subprocess with its own time limit (a part that overruns is stopped and recorded
as timeout, one that crashes as failed, and the next part runs; the whole run stops starting parts at --total):
  cuda_tests  pytest -m cuda over tests/ (junit xml: passed/failed/skipped counts and failing names)
  train_step  bench/train_step.py: the QAT / KD step ratio of kd, qat, +compile and the qat.fast speed-ups
  kernels     bench/int_kernels.py: the integer runtime linears (W4A16 incl. tinygemm, W8A16, W8A8, W4A8) vs bf16
  decode      bench/decode.py: decode tokens/s of converted models vs bf16
  model       the bundled model as an HF folder (converted from its GGUF where --model is one)
  zero2/zero3 `python -m trainer train configs/llm_qat/w4a8kv8.yaml` under DeepSpeed ZeRO-2/3, a few steps
  qlora       bench/qlora_memory.py at the 1B shape: QLoRA peak memory and step time against LoRA
  moe         bench/moe.py at Qwen3-30B-A3B's MoE layer: QAT step and int inference of the experts vs their own
Writes DIR/<part>.json (status ok|failed|timeout|skipped, reason, wall_s, numbers), DIR/<part>.log, DIR/suite.json
and DIR/summary.md after every part. --cpu-smoke: every part's code path on CPU, tiny shapes, no figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench._suite_parts import BUDGET, PARTS, ROOT, SMOKE_BUDGET, VARIANTS
from bench._suite_run import environment, run_part
from bench._suite_summary import summary

# What each part runs is bench/_suite_parts.py; how one runs, bench/_suite_run.py; summary.md, bench/_suite_summary.py.
__all__ = ["BUDGET", "PARTS", "SMOKE_BUDGET", "VARIANTS", "main", "parse_args", "run_part"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for the JSON records and summary.md")
    p.add_argument("--model", help="the bundled model: an HF folder, or its GGUF file (converted to <dir>/hf); "
                                   "default /root/stash/hf, else /root/stash/model.gguf")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="override a part's limit")
    p.add_argument("--total", type=float, default=480.0, help="no part starts after this many seconds in all")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: every code path, no figures")
    p.add_argument("--work", type=Path, help="scratch folder for run folders and models (default: a temp dir)")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if bad := [x for x in args.parts if x not in PARTS]:
        p.error(f"unknown part {bad[0]!r}; one of {', '.join(PARTS)}")
    budget = dict(SMOKE_BUDGET if args.cpu_smoke else BUDGET)
    for item in args.budget:
        name, _, secs = item.partition("=")
        if name not in PARTS or not secs.replace(".", "", 1).isdigit():
            p.error(f"--budget {item!r}: <part>=<seconds> with a part of {', '.join(PARTS)}")
        budget[name] = float(secs)
    args.budget = budget
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="distqat-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU smoke run stays on CPU on a GPU machine too
    meta = environment(args.cpu_smoke)
    ctx = argparse.Namespace(args=args, out=args.out, work=work, smoke=args.cpu_smoke, env=env, model=None,
                             gpu=meta["device"] != "cpu")
    records, t_start = {}, time.perf_counter()
    for name in PARTS:
        if name not in args.parts:
            continue
        left = args.total - (time.perf_counter() - t_start)
        if left < 5:
            reason = f"the suite's --total {args.total:.0f} s was spent"
            rec = {"part": name, "status": "skipped", "reason": reason, "budget_s": args.budget[name], "wall_s": 0.0}
        else:
            limit = min(args.budget[name], left)
            print(f"suite: {name} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
            rec = run_part(name, ctx, limit)
        records[name] = rec
        print(f"suite: {name} {rec['status']} in {rec['wall_s']:.0f} s {rec['reason'] or ''}", file=sys.stderr)
        (args.out / f"{name}.json").write_text(json.dumps(rec, indent=2))
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        (args.out / "suite.json").write_text(json.dumps({**meta, "parts": records}, indent=2))
        (args.out / "summary.md").write_text(summary(meta, records))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print((args.out / "summary.md").read_text())
    return 0 if all(r["status"] in ("ok", "skipped") for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

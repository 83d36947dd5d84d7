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
Writes DIR/<part>.json (status ok|failed|timeout|skipped, reason, wall_s, numbers), DIR/<part>.log, DIR/suite.json
and DIR/summary.md after every part. --cpu-smoke: every part's code path on CPU, tiny shapes, no figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("cuda_tests", "train_step", "kernels", "decode", "model", "zero2", "zero3", "qlora")
# Seconds per part on the GPU (maxima: a part that ends early leaves its time to the --total cap of 480 s).
BUDGET = {"cuda_tests": 75, "train_step": 150, "kernels": 90, "decode": 60, "model": 75, "zero2": 45, "zero3": 50,
          "qlora": 40}
SMOKE_BUDGET = {p: 120 for p in PARTS}
VARIANTS = ["kd", "qat", "qat+norm_quant", "qat+weight_batch", "qat+kv_direct", "qat+norm_quant+weight_batch+kv_direct",
            "kd+compile", "qat+compile"]  # the compiled pair last: the slowest to start, least lost to a timeout
STOP_GRACE_S = 5


class Skip(Exception):
    """A part that cannot run here: its reason goes into the record."""


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


# The parts: each returns (command or None when nothing needs running, extra environment, parse(record) -> dict
# of results), or raises Skip.
def py(script: str, *args) -> list[str]:  # bench/<name>.py as the module bench.<name>, from the checkout's root
    return [sys.executable, "-m", "bench." + Path(script).stem, *map(str, args)]


def common(fn: str, *args) -> list[str]:  # bench._common.<fn>(*args) in a subprocess: the model part's helpers
    return [sys.executable, "-c", f"import sys; from bench._common import {fn}; sys.exit({fn}(*sys.argv[1:]))",
            *map(str, args)]


def part_cuda_tests(ctx):
    if importlib.util.find_spec("pytest") is None:
        raise Skip("pytest is not installed here (add its wheels to .whl: docs/BENCHMARKS.md)")
    xml = ctx.out / "cuda_tests.xml"
    # The smoke run takes two files whose CUDA tests skip at once on CPU; the GPU run all of tests/.
    where = ["tests/test_ptq.py", "tests/test_kernels.py"] if ctx.smoke else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-m", "cuda", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", f"--junitxml={xml}", *where]
    return cmd, {}, lambda rec: junit_counts(xml)


def junit_counts(xml: Path) -> dict:
    import xml.etree.ElementTree as ET  # lazy: only once a test run wrote its report

    if not xml.is_file():
        return {}
    counts, failing, skip_reasons = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}, [], {}
    for case in ET.parse(xml).iter("testcase"):
        tags = {child.tag: child for child in case}
        if "failure" in tags or "error" in tags:
            counts["failed" if "failure" in tags else "errors"] += 1
            failing.append(f"{case.get('classname')}::{case.get('name')}")
        elif "skipped" in tags:
            counts["skipped"] += 1
            why = tags["skipped"].get("message", "")
            skip_reasons[why] = skip_reasons.get(why, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failing": failing, "skip_reasons": skip_reasons}


def part_train_step(ctx):
    out = ctx.out / "train_step_raw.json"
    variants, left_out = list(VARIANTS), None
    if not (ROOT / "qat" / "fast.py").is_file():
        left_out = "qat/fast.py is not in this tree: the speed-up variants cannot run"
        variants = [v for v in variants if all(p in ("kd", "qat", "compile") for p in v.split("+"))]
    shape = (["--device", "cpu", "--shape", "tiny", "--batch", 2, "--seq", 32, "--steps", 2, "--warmup", 1,
              "--compile-backend", "eager"] if ctx.smoke else ["--shape", "smollm2-135m", "--batch", 4,
                                                                   "--seq", 1024, "--steps", 5])
    cmd = py("bench/train_step.py", *shape, "--variants", ",".join(variants), "--json", out)

    def parse(rec):
        rows = json.loads(out.read_text()) if out.is_file() else {}
        return {"variants": rows, "variants_left_out": left_out,
                "ratios": {k: r.get("ratio") for k, r in rows.items() if k.startswith("qat")}}
    return cmd, {}, parse


def part_kernels(ctx):
    out = ctx.out / "kernels_raw.json"
    # Smoke: the Triton kernels too, in the interpreter; on the GPU three K x N shapes, M from decode to prefill.
    flags = ["--cpu-smoke"] if ctx.smoke else ["--m", "1,16,256,4096", "--rep", 20, "--rounds", 1, "--heat", 0.5]
    env = {"TRITON_INTERPRET": "1"} if ctx.smoke else {}

    def parse(rec):
        raw = json.loads(out.read_text()) if out.is_file() else {}
        table = [{"shape": f"{r['K']}x{r['N']}", "path": r["path"], "M": r["M"], "bf16_us": r["bf16_us"],
                  "speedup": r["speedup"], "chosen": r["chosen"], "chosen_speedup": r["chosen_speedup"],
                  "best": r["best"], "max_rel_diff": max(r["max_rel_diff"].values(), default=None)}
                 for r in raw.get("results", [])]
        return {"rows": table, "complete": bool(raw.get("complete"))}
    return py("bench/int_kernels.py", *flags, "--json", out), env, parse


def part_decode(ctx):
    out = ctx.out / "decode_raw.json"
    flags = (["--device", "cpu", "--shapes", "tiny", "--batches", "1,2", "--prompt", 8, "--steps", 4] if ctx.smoke
             else ["--shapes", "smollm2-135m,llama-1b", "--batches", "1,16", "--steps", 32])
    return py("bench/decode.py", *flags, "--json", out), {}, lambda rec: {
        "rows": json.loads(out.read_text()) if out.is_file() else []}


def part_model(ctx):
    if ctx.smoke:
        ctx.model = ctx.work / "tiny-model"
        return common("make_tiny_model", ctx.model), {}, lambda rec: {
            "path": str(ctx.model), "what": "tiny random Llama with the bundled tokenizer"}
    given = Path(ctx.args.model) if ctx.args.model else next(
        (p for p in (Path("/root/stash/hf"), Path("/root/stash/model.gguf")) if p.exists()), None)
    if given is None or not given.exists():
        raise Skip(f"no model at {given or '/root/stash/hf or /root/stash/model.gguf'} (transfer the bundled model: "
                   "docs/BENCHMARKS.md)")
    if (given / "config.json").is_file():
        ctx.model = given
        return None, {}, lambda rec: {"path": str(given), "what": "HF folder as given"}
    gguf = given if given.is_file() else next(iter(sorted(given.glob("*.gguf"))), None)
    if gguf is None:
        raise Skip(f"{given} holds neither config.json nor a .gguf file")
    ctx.model = gguf.parent / "hf"
    if (ctx.model / "config.json").is_file():
        return None, {}, lambda rec: {"path": str(ctx.model), "what": f"converted earlier from {gguf.name}"}
    return common("convert_gguf", gguf, ctx.model), {}, lambda rec: {
        "path": str(ctx.model), "what": f"converted from {gguf}"}


def part_zero(ctx, stage: int):
    if ctx.model is None or not (Path(ctx.model) / "config.json").is_file():
        raise Skip("the model part left no model folder")
    corpus = ctx.work / "corpus.txt"  # the project's own prose: real text, at hand on any machine
    if not corpus.is_file():
        corpus.write_text("\n\n".join(p.read_text() for p in [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]) * 3)
    run = ctx.work / f"zero{stage}"
    shutil.rmtree(run, ignore_errors=True)
    size = (["data.seq_len=32", "train.max_steps=2", "train.micro_batch_size=2"] if ctx.smoke
            else ["data.seq_len=512", "train.max_steps=8", "train.micro_batch_size=4"])
    cmd = [sys.executable, "-m", "trainer", "train", "configs/llm_qat/w4a8kv8.yaml", f"model.name_or_path={ctx.model}",
           f"data.path={corpus}", *size, "train.progress_every_s=0", "distributed.strategy=deepspeed",
           f"distributed.zero_stage={stage}", f"output_dir={run}"]
    env = {"DS_ACCELERATOR": "cpu"} if ctx.smoke else {}
    return cmd, env, lambda rec: train_metrics(run, ctx.out / f"zero{stage}_metrics.csv")


def train_metrics(run: Path, keep: Path) -> dict:
    import csv  # lazy: only the training parts read a CSV

    files = sorted(run.glob("logs/version_*/metrics.csv"))
    if not files:
        return {}
    shutil.copy(files[-1], keep)
    rows = list(csv.DictReader(files[-1].open()))
    tps = [float(r["train/tokens_per_s"]) for r in rows if r.get("train/tokens_per_s")]
    loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    warm = tps[1:] or tps  # the first logged value still holds the first steps' start-up
    return {"steps": len(loss), "losses": loss, "tokens_per_s": tps,
            "tokens_per_s_warm_median": statistics.median(warm) if warm else None,
            "model_saved": (run / "model" / "config.json").is_file()}


def part_qlora(ctx):
    out = ctx.out / "qlora_raw.json"
    flags = (["--shapes", "tiny", "--seq", 16, "--steps", 1, "--variants", "lora,qlora-int4"] if ctx.smoke
             else ["--shapes", "llama-1b", "--seq", 256, "--steps", 3, "--dtype", "bfloat16"])
    return py("bench/qlora_memory.py", *flags, "--batch", 1, "--json", out), {}, lambda rec: {
        "rows": json.loads(out.read_text())["rows"] if out.is_file() else []}


BUILDERS = {"cuda_tests": part_cuda_tests, "train_step": part_train_step, "kernels": part_kernels,
            "decode": part_decode, "model": part_model, "zero2": lambda c: part_zero(c, 2),
            "zero3": lambda c: part_zero(c, 3), "qlora": part_qlora}


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
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**ctx.env, **env},
                                start_new_session=True)  # its own process group: a timeout stops its children too
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
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
        gpu = r.stdout.strip() or None
    return {"date": datetime.date.today().isoformat(), "device": gpu or "cpu", "smoke": smoke, "versions": versions}


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def key_numbers(rec: dict) -> str:
    """One cell of the summary table: the figures a part exists for."""
    name = rec["part"]
    if rec["status"] == "skipped":
        return rec["reason"] or ""
    if name == "cuda_tests" and "passed" in rec:
        return (f"{rec['passed']} passed, {rec['failed']} failed, {rec['errors']} errors, {rec['skipped']} skipped"
                + (f"; failing: {', '.join(rec['failing'][:5])}" if rec["failing"] else ""))
    if name == "train_step" and rec.get("variants"):
        kd = rec["variants"].get("kd")
        return (f"kd {fmt(kd and kd['ms'], '.1f')} ms/step; " if kd else "") + "; ".join(
            f"{k} {fmt(v, '.3f')}x" for k, v in rec["ratios"].items())
    if name == "kernels" and rec.get("rows"):  # the figures asked for, x bf16 per K x N shape
        rows, top = rec["rows"], max(r["M"] for r in rec["rows"])
        picks = [("w4a16", "gemv", 1), ("w4a16", "tinygemm", 1), ("w8a8", "triton", top), ("w8a8", "int_mm", top),
                 ("w4a8", "triton", top)]
        cells = [(f"{p} {i} M={m} ", [fmt(r["speedup"][i]) for r in rows if (r["path"], r["M"]) == (p, m)
                                      and i in r["speedup"]]) for p, i, m in picks]
        slower = sum(1 for r in rows if (r["chosen_speedup"] or 0) < 1)
        return "; ".join(c + "/".join(x) + "x" for c, x in cells if x) + f"; chosen < bf16 in {slower} of {len(rows)}"
    if name == "decode" and rec.get("rows"):
        return "; ".join(f"{r['shape']} b{r['batch']} {r['lm_head']} {r['int_tok_s']:.0f} tok/s ({r['speedup']:.2f}x)"
                         for r in rec["rows"])
    if name == "model":
        return f"{rec.get('what', '')}: {rec.get('path', '')}"
    if name.startswith("zero") and rec.get("tokens_per_s_warm_median") is not None:
        return f"{rec['tokens_per_s_warm_median']:.0f} tokens/s (median after the first step), {rec['steps']} steps"
    if name == "qlora" and rec.get("rows"):
        lora = {r["shape"]: r for r in rec["rows"] if r["variant"] == "lora"}
        return "; ".join(f"{r['shape']} {r['variant']} peak {r['peak_gb']:.2f} GB"
                         + (f" ({r['peak_gb'] / lora[r['shape']]['peak_gb']:.2f}x, step "
                            f"{r['step_s'] / lora[r['shape']]['step_s']:.2f}x)" if r["shape"] in lora else "")
                         for r in rec["rows"])
    return rec.get("reason") or ""


def head(*cols: str) -> list[str]:
    return ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def summary(meta: dict, records: dict) -> str:
    v = meta["versions"]
    lines = [f"# distqat GPU suite: {meta['device']}, {meta['date']}", "",
             ", ".join(f"{k} {x}" for k, x in v.items() if x) + f"; {meta.get('wall_s', 0):.0f} s in all."]
    if meta["smoke"]:
        lines.append("CPU smoke run (tiny shapes, a tiny random model): it checks code paths; no figures.")
    lines += head("part", "status", "wall s", "limit s", "key numbers")
    lines += [f"| {r['part']} | {r['status']} | {r['wall_s']:.0f} | {r['budget_s']:.0f} | "
              f"{key_numbers(r).replace('|', '/')} |" for r in records.values()]
    ts = records.get("train_step", {}).get("variants")
    if ts:
        lines += ["", "## train_step", *head("variant", "ms/step", "tokens/s", "peak GB", "ratio", "vs")]
        lines += [f"| {k} | {r['ms']:.2f} | {r['tokens_per_s']:.0f} | {fmt(r['peak_gb'])} | {fmt(r['ratio'], '.3f')} | "
                  f"{r['ratio_vs'] or '-'} |" for k, r in ts.items()]
        if records["train_step"].get("variants_left_out"):
            lines.append(f"\nLeft out: {records['train_step']['variants_left_out']}.")
    kr = records.get("kernels", {}).get("rows")
    if kr:
        lines += ["", "## kernels (speedup = bf16 time / implementation time)",
                  *head("K x N", "path", "M", "bf16 us", "chosen", "x bf16", "best", "all")]
        lines += [f"| {r['shape']} | {r['path']} | {r['M']} | {r['bf16_us']:.1f} | {r['chosen']} | "
                  f"{fmt(r['chosen_speedup'])} | {r['best']} | "
                  + ", ".join(f"{i} {x:.2f}" for i, x in r["speedup"].items()) + " |" for r in kr]
    dr = records.get("decode", {}).get("rows")
    if dr:
        lines += ["", "## decode", *head("shape", "scheme", "lm_head", "batch", "bf16 tok/s", "int tok/s",
                                          "int / bf16", "graphs")]
        lines += [f"| {r['shape']} | {r['scheme']} | {r['lm_head']} | {r['batch']} | {r['bf16_tok_s']:.0f} | "
                  f"{r['int_tok_s']:.0f} | {r['speedup']:.2f} | {r['graphs']} |" for r in dr]
    for name, r in records.items():
        if r["status"] in ("failed", "timeout"):
            tail = r.get("log_tail") or ""
            lines += ["", f"## {name}: {r['status']} ({r['reason']})", "", "```", *tail.splitlines()[-15:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="distqat-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
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
            rec = {"part": name, "status": "skipped", "reason": f"the suite's --total {args.total:.0f} s was spent",
                   "budget_s": args.budget[name], "wall_s": 0.0}
        else:
            print(f"suite: {name} (limit {min(args.budget[name], left):.0f} s)", file=sys.stderr, flush=True)
            rec = run_part(name, ctx, min(args.budget[name], left))
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

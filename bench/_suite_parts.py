"""The parts of bench/suite.py: what each one runs, and how its record is read back.

Each builder takes the suite's context and returns (the command, or None when nothing needs running; extra
environment; parse(record) -> the part's results), or raises Skip.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("cuda_tests", "train_step", "kernels", "decode", "model", "zero2", "zero3", "qlora", "moe")
# Seconds per part on the GPU (maxima: a part that ends early leaves its time to the --total cap of 480 s).
BUDGET = {
    "cuda_tests": 75,
    "train_step": 150,
    "kernels": 90,
    "decode": 60,
    "model": 75,
    "zero2": 45,
    "zero3": 50,
    "qlora": 40,
    "moe": 150,  # an estimate: the layer is built and converted twice on the host's CPU before it is timed
}
SMOKE_BUDGET = {p: 120 for p in PARTS}
# The compiled pair last: the slowest to start, least lost to a timeout.
VARIANTS = [
    "kd",
    "qat",
    "qat+norm_quant",
    "qat+weight_batch",
    "qat+kv_direct",
    "qat+norm_quant+weight_batch+kv_direct",
    "kd+compile",
    "qat+compile",
]


class Skip(Exception):
    """A part that cannot run here: its reason goes into the record."""


def py(script: str, *args) -> list[str]:
    """bench/<name>.py as the module bench.<name>, run from the checkout's root."""
    return [sys.executable, "-m", "bench." + Path(script).stem, *map(str, args)]


def common(fn: str, *args) -> list[str]:
    """bench._common.<fn>(*args) in a subprocess: the model part's helpers."""
    code = f"import sys; from bench._common import {fn}; sys.exit({fn}(*sys.argv[1:]))"
    return [sys.executable, "-c", code, *map(str, args)]


def read_json(path: Path, default):
    """What a part wrote to `path`, or `default` where it wrote nothing."""
    return json.loads(path.read_text()) if path.is_file() else default


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
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing, skip_reasons = [], {}
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
    if ctx.smoke:
        shape = ["--device", "cpu", "--shape", "tiny", "--batch", 2, "--seq", 32, "--steps", 2, "--warmup", 1,
                 "--compile-backend", "eager"]
    else:
        shape = ["--shape", "smollm2-135m", "--batch", 4, "--seq", 1024, "--steps", 5]
    cmd = py("bench/train_step.py", *shape, "--variants", ",".join(variants), "--json", out)

    def parse(rec):
        rows = read_json(out, {})
        ratios = {k: r.get("ratio") for k, r in rows.items() if k.startswith("qat")}
        return {"variants": rows, "variants_left_out": left_out, "ratios": ratios}

    return cmd, {}, parse


def part_kernels(ctx):
    out = ctx.out / "kernels_raw.json"
    # Smoke: the Triton kernels too, in the interpreter; on the GPU three K x N shapes, M from decode to prefill.
    if ctx.smoke:
        flags = ["--cpu-smoke"]
    else:
        flags = ["--m", "1,16,256,4096", "--rep", 20, "--rounds", 1, "--heat", 0.5]
    env = {"TRITON_INTERPRET": "1"} if ctx.smoke else {}

    def parse(rec):
        raw = read_json(out, {})
        table = [
            {
                "shape": f"{r['K']}x{r['N']}",
                "path": r["path"],
                "M": r["M"],
                "bf16_us": r["bf16_us"],
                "speedup": r["speedup"],
                "chosen": r["chosen"],
                "chosen_speedup": r["chosen_speedup"],
                "best": r["best"],
                "max_rel_diff": max(r["max_rel_diff"].values(), default=None),
            }
            for r in raw.get("results", [])
        ]
        return {"rows": table, "complete": bool(raw.get("complete"))}

    return py("bench/int_kernels.py", *flags, "--json", out), env, parse


def part_decode(ctx):
    out = ctx.out / "decode_raw.json"
    if ctx.smoke:
        flags = ["--device", "cpu", "--shapes", "tiny", "--batches", "1,2", "--prompt", 8, "--steps", 4]
    else:
        flags = ["--shapes", "smollm2-135m,llama-1b", "--batches", "1,16", "--steps", 32]
    return py("bench/decode.py", *flags, "--json", out), {}, lambda rec: {"rows": read_json(out, [])}


def part_model(ctx):
    if ctx.smoke:
        ctx.model = ctx.work / "tiny-model"
        what = "tiny random Llama with the bundled tokenizer"
        return common("make_tiny_model", ctx.model), {}, lambda rec: {"path": str(ctx.model), "what": what}
    if ctx.args.model:
        given = Path(ctx.args.model)
    else:
        given = next((p for p in (Path("/root/stash/hf"), Path("/root/stash/model.gguf")) if p.exists()), None)
    if given is None or not given.exists():
        where = given or "/root/stash/hf or /root/stash/model.gguf"
        raise Skip(f"no model at {where} (transfer the bundled model: docs/BENCHMARKS.md)")
    if (given / "config.json").is_file():
        ctx.model = given
        return None, {}, lambda rec: {"path": str(given), "what": "HF folder as given"}
    gguf = given if given.is_file() else next(iter(sorted(given.glob("*.gguf"))), None)
    if gguf is None:
        raise Skip(f"{given} holds neither config.json nor a .gguf file")
    ctx.model = gguf.parent / "hf"
    if (ctx.model / "config.json").is_file():
        what = f"converted earlier from {gguf.name}"
        return None, {}, lambda rec: {"path": str(ctx.model), "what": what}
    what = f"converted from {gguf}"
    return common("convert_gguf", gguf, ctx.model), {}, lambda rec: {"path": str(ctx.model), "what": what}


def part_zero(ctx, stage: int):
    if ctx.model is None or not (Path(ctx.model) / "config.json").is_file():
        raise Skip("the model part left no model folder")
    corpus = ctx.work / "corpus.txt"  # the project's own prose: real text, at hand on any machine
    if not corpus.is_file():
        prose = [ROOT / "README.md", *sorted(ROOT.glob("docs/*.md"))]
        corpus.write_text("\n\n".join(p.read_text() for p in prose) * 3)
    run = ctx.work / f"zero{stage}"
    shutil.rmtree(run, ignore_errors=True)
    if ctx.smoke:
        size = ["data.seq_len=32", "train.max_steps=2", "train.micro_batch_size=2"]
    else:
        size = ["data.seq_len=512", "train.max_steps=8", "train.micro_batch_size=4"]
    cmd = [sys.executable, "-m", "trainer", "train", "configs/llm_qat/w4a8kv8.yaml",
           f"model.name_or_path={ctx.model}", f"data.path={corpus}", *size, "train.progress_every_s=0",
           "distributed.strategy=deepspeed", f"distributed.zero_stage={stage}", f"output_dir={run}"]
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
    return {
        "steps": len(loss),
        "losses": loss,
        "tokens_per_s": tps,
        "tokens_per_s_warm_median": statistics.median(warm) if warm else None,
        "model_saved": (run / "model" / "config.json").is_file(),
    }


def part_qlora(ctx):
    out = ctx.out / "qlora_raw.json"
    if ctx.smoke:
        flags = ["--shapes", "tiny", "--seq", 16, "--steps", 1, "--variants", "lora,qlora-int4"]
    else:
        flags = ["--shapes", "llama-1b", "--seq", 256, "--steps", 3, "--dtype", "bfloat16"]

    def parse(rec):
        return {"rows": json.loads(out.read_text())["rows"] if out.is_file() else []}

    return py("bench/qlora_memory.py", *flags, "--batch", 1, "--json", out), {}, parse


def part_moe(ctx):
    out = ctx.out / "moe_raw.json"
    if ctx.smoke:  # in Triton's interpreter: the fused fake-quant and int kernels' code paths too
        flags = ["--device", "cpu", "--shape", "tiny", "--tokens", 16, "--infer-tokens", "4,16", "--rounds", 1,
                 "--repeats", 1]
    else:
        flags = ["--shape", "qwen3-30b-a3b-layer", "--tokens", 8192, "--infer-tokens", "16,8192", "--rep", 50,
                 "--heat", 1]
    env = {"TRITON_INTERPRET": "1"} if ctx.smoke else {}

    def parse(rec):
        raw = read_json(out, {})
        return {k: raw.get(k) for k in ("shape", "own_impl", "qat_step", "inference")} | {
            "complete": bool(raw.get("complete"))}

    return py("bench/moe.py", *flags, "--json", out), env, parse


BUILDERS = {
    "cuda_tests": part_cuda_tests,
    "train_step": part_train_step,
    "kernels": part_kernels,
    "decode": part_decode,
    "model": part_model,
    "zero2": lambda c: part_zero(c, 2),
    "zero3": lambda c: part_zero(c, 3),
    "qlora": part_qlora,
    "moe": part_moe,
}

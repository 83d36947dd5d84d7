"""bench/gpu_suite.sh, the one command that measures the GPU figures: its --cpu-smoke run goes through every part
on CPU (tiny shapes, a tiny random model) and records numbers from the run itself; a part over its time limit is
stopped and recorded as timeout while the next part still runs; parts missing a resource are skipped with a reason."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import suite  # noqa: E402
from bench.train_step import canonical, parse_variant  # noqa: E402

HAVE_FAST = importlib.util.find_spec("qat.fast") is not None


def run_suite(out: Path, *args: str, timeout: int = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--cpu-smoke", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def record(out: Path, part: str) -> dict:
    return json.loads((out / f"{part}.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, bundled_path):  # bundled_path: the tokenizer the tiny model takes is converted already
    out = tmp_path_factory.mktemp("suite")
    r = run_suite(out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_every_part_runs_on_cpu_and_records_its_numbers(smoke):
    summary = (smoke / "summary.md").read_text()
    everything = json.loads((smoke / "suite.json").read_text())
    assert everything["smoke"] is True and list(everything["parts"]) == list(suite.PARTS)
    for part in suite.PARTS:
        rec = record(smoke, part)
        assert rec["status"] == "ok", (part, rec.get("reason"), rec.get("log_tail"))
        assert rec["wall_s"] >= 0 and f"| {part} | ok |" in summary

    tests = record(smoke, "cuda_tests")  # on CPU the CUDA tests skip, each for a stated CUDA reason
    assert tests["skipped"] > 0 and tests["failed"] == tests["errors"] == 0 and not tests["failing"]
    assert all("CUDA" in why or "GPU" in why for why in tests["skip_reasons"]), tests["skip_reasons"]
    assert (smoke / "cuda_tests.xml").is_file()


def test_train_step_ratios_come_from_the_same_run(smoke):
    rec = record(smoke, "train_step")
    rows = rec["variants"]
    want = suite.VARIANTS if HAVE_FAST else [v for v in suite.VARIANTS if "compile" in v or "+" not in v]
    assert list(rows) == want
    if not HAVE_FAST:
        assert "qat/fast.py" in rec["variants_left_out"]
    for label, row in rows.items():
        assert row["ms"] > 0 and row["tokens_per_s"] > 0 and row["device"] == "cpu"
        base = "kd+compile" if "+compile" in label else "kd"
        assert row["ratio_vs"] == base and row["ratio"] == pytest.approx(row["ms"] / rows[base]["ms"])
    for label in ("qat", "qat+compile", *([v for v in suite.VARIANTS if "norm_quant" in v] if HAVE_FAST else [])):
        assert rec["ratios"][label] == pytest.approx(rows[label]["ratio"])
    if HAVE_FAST:
        assert rows["qat+norm_quant+weight_batch+kv_direct"]["speedups"], "qat.fast enabled nothing"
    assert "## train_step" in (smoke / "summary.md").read_text()


def test_kernels_decode_zero_and_qlora_numbers(smoke):
    kernels = record(smoke, "kernels")
    assert kernels["complete"] and {r["path"] for r in kernels["rows"]} == {"w4a16", "w8a16", "w8a8", "w4a8"}
    for r in kernels["rows"]:
        assert r["bf16_us"] > 0 and r["speedup"] and all(x > 0 for x in r["speedup"].values())
        assert r["max_rel_diff"] is not None and r["max_rel_diff"] < 0.05  # every implementation agreed
    decode = record(smoke, "decode")["rows"]
    assert {(r["batch"], r["lm_head"]) for r in decode} == {(1, "bf16"), (1, "w8"), (2, "bf16"), (2, "w8")}
    for r in decode:
        assert r["int_tok_s"] > 0 and r["speedup"] == pytest.approx(r["bf16_ms"] / r["int_ms"]) and not r["graphs"]
    for stage in (2, 3):
        z = record(smoke, f"zero{stage}")
        assert z["steps"] == 2 and all(math.isfinite(x) for x in z["losses"]) and z["model_saved"]
        assert z["tokens_per_s_warm_median"] > 0 and (smoke / f"zero{stage}_metrics.csv").is_file()
        assert "distributed.strategy=deepspeed" in z["command"] and f"zero_stage={stage}" in z["command"]
    qlora = record(smoke, "qlora")["rows"]
    assert [r["variant"] for r in qlora] == ["lora", "qlora-int4"] and all(r["peak_gb"] > 0 for r in qlora)


def test_moe_ratios_and_the_kernels_in_the_interpreter(smoke):
    moe = record(smoke, "moe")
    assert moe["complete"] and moe["shape"] == "tiny"
    fused = [r for r in moe["qat_step"] if r["variant"] == "fused"]
    assert len(fused) == 2 and all(r["note"] == "equals reference" for r in fused)  # the kernel, interpreted
    ints = [r for r in moe["inference"] if r["variant"] == "int"]
    assert {r["scheme"] for r in ints} == {"w4g32", "w8a8"} and all(r["max_rel_diff"] < 1e-5 for r in ints)
    assert all(r["ratio"] > 0 for r in moe["qat_step"] + moe["inference"])
    assert "## moe (tiny" in (smoke / "summary.md").read_text()


def test_a_part_over_its_limit_is_stopped_and_the_next_still_runs(tmp_path):
    r = run_suite(tmp_path, "--parts", "train_step,kernels", "--budget", "train_step=1", timeout=90)
    assert r.returncode == 1  # a timeout is not a pass
    slow, nxt = record(tmp_path, "train_step"), record(tmp_path, "kernels")
    assert slow["status"] == "timeout" and "limit of 1 s" in slow["reason"] and slow["wall_s"] < 1 + 2 * 5 + 5
    assert nxt["status"] == "ok" and nxt["rows"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| train_step | timeout |" in summary and "| kernels | ok |" in summary
    assert not (tmp_path / "decode.json").exists()  # only the parts asked for


def context(tmp_path, *argv, gpu: bool = True) -> argparse.Namespace:
    args = suite.parse_args(["--out", str(tmp_path), *argv])
    return argparse.Namespace(args=args, out=tmp_path, work=tmp_path, smoke=args.cpu_smoke, env=dict(os.environ),
                              model=None, gpu=gpu)


def test_missing_resources_are_skipped_with_the_reason(tmp_path):
    rec = suite.run_part("kernels", context(tmp_path, gpu=False), 10)  # a GPU run where there is none
    assert rec["status"] == "skipped" and "no CUDA GPU" in rec["reason"] and "--cpu-smoke" in rec["reason"]
    ctx = context(tmp_path, "--model", str(tmp_path / "nowhere"))
    rec = suite.run_part("model", ctx, 10)
    assert rec["status"] == "skipped" and "no model at" in rec["reason"]
    rec = suite.run_part("zero2", ctx, 10)
    assert rec["status"] == "skipped" and "no model folder" in rec["reason"]
    folder = tmp_path / "hf"  # an HF folder as given needs no subprocess
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    rec = suite.run_part("model", context(tmp_path, "--model", str(folder)), 10)
    assert rec["status"] == "ok" and rec["path"] == str(folder)


def test_variant_labels_and_budgets():
    assert parse_variant("qat+compile+norm_quant") == ("qat", True, ["norm_quant"])
    assert canonical("kd-compile") == "kd+compile" and canonical("qat-compile") == "qat+compile"
    assert canonical("qat+kv_direct+compile") == "qat+compile+kv_direct"
    for bad in ("foo", "qat+", "qat+kv_direct+kv_direct", "compile"):
        with pytest.raises(ValueError):
            parse_variant(bad)
    if HAVE_FAST:
        from qat import fast

        assert {p for v in suite.VARIANTS for p in v.split("+")[1:]} - {"compile"} == set(fast.SPEEDUPS)
    assert suite.parse_args(["--out", "x"]).total <= 8 * 60
    assert suite.parse_args(["--out", "x", "--budget", "kernels=7"]).budget["kernels"] == 7
    with pytest.raises(SystemExit):
        suite.parse_args(["--out", "x", "--budget", "nope=3"])

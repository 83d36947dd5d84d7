"""`distqat train train.mode=qlora` end to end on a tiny base: the loss on held-out instructions falls, the
checkpoints hold the adapters and the base's fingerprint only, resume works and refuses another base, the
merged folders convert and evaluate, DeepSpeed ZeRO-2 runs on 2 processes and ZeRO-3 is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher

from qat.load import Kind, inspect, load

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, bundled_tokenizer):
    return save_tiny_teacher(tmp_path_factory.mktemp("qlora") / "base", bundled_tokenizer, max_positions=256,
                             init_range=0.1)


def train_args(base, out, *extra):
    return ["-m", "trainer", "train", PUBLISHED, f"model.name_or_path={base}", "quant.scheme=w4g32", "train.mode=qlora",
            "data.path=bundled:instructions", "data.format=instructions", "data.seq_len=64", "train.max_steps=8",
            "train.micro_batch_size=2", "train.lr=2e-3", "train.save_every=4", "train.val_every=1000",
            "train.keep_last=5", "lora.r=4", "distributed.strategy=single", f"output_dir={out}", *extra]


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def test_qlora_run_lowers_held_out_loss_and_writes_adapters_and_a_merge_that_converts(tiny_base, tmp_path):
    out = tmp_path / "run"
    r = run(*train_args(tiny_base, out, "lora.merge=requant"))
    assert r.returncode == 0, r.stderr[-3000:]
    losses = json.loads((out / "qlora_eval.json").read_text())["held_out_loss"]
    assert losses["trained"] < losses["base"]
    assert abs(losses["merged (requant)"] - losses["trained"]) < abs(losses["base"] - losses["trained"]) + 1e-3 \
        or losses["merged (requant)"] <= losses["base"]
    record = json.loads((out / "adapters" / "distqat_qlora.json").read_text())
    assert record["base_kind"] == "base" and len(record["fingerprint"]) == 64
    assert (out / "adapters" / "adapter_model.safetensors").is_file()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["merge"] == "requant-rtn" and len(report["layers"]) == 14
    # The checkpoint: the adapters, their optimizer state and the base's fingerprint, no base tensor.
    ckpt = torch.load(out / "checkpoints" / "step=8.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["distqat_base_fingerprint"] == record["fingerprint"]
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    # The merged PTQ folder converts and evaluates like any other.
    assert inspect(out / "model").kind is Kind.PTQ
    r = run("-m", "trainer", "convert", str(out / "model"), "--out", str(out / "int"))
    assert r.returncode == 0, r.stderr[-2000:]
    corpus = tmp_path / "c.txt"
    corpus.write_text("Instructions and answers, short and plain. " * 30)
    r = run("-m", "trainer", "eval", PUBLISHED, f"model.name_or_path={out / 'int'}", f"data.path={corpus}",
            "eval.max_tokens=64", "eval.seq_len=32", f"output_dir={tmp_path / 'ev'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(json.loads((tmp_path / "ev" / "eval.json").read_text())["perplexity"]) == ["w4g32 (int)"]


def test_resume_continues_and_refuses_another_base(tiny_base, tmp_path):
    out = tmp_path / "run"
    assert run(*train_args(tiny_base, out, "train.max_steps=4")).returncode == 0
    r = run(*train_args(tiny_base, out, "train.max_steps=8"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Restoring states from the checkpoint" in r.stderr or "Restored all states" in r.stderr
    assert (out / "checkpoints" / "step=8.ckpt").exists()
    r = run(*train_args(tiny_base, out, "train.max_steps=12", "quant.scheme=w4g32asym"))
    assert r.returncode == 2 and "trained on another base" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    # Other adapters (fewer targets) are refused, naming the change, rather than started fresh.
    r = run(*train_args(tiny_base, out, "train.max_steps=12", "lora.target_modules=[q_proj]"))
    assert r.returncode == 2 and "holds other adapters: lora.target_modules adapted 14 layers there and 2 now" in \
        r.stderr.strip().splitlines()[-1], r.stderr[-2000:]


def test_qalora_merge_is_an_integer_checkpoint(tiny_base, tmp_path):
    out = tmp_path / "qa"
    r = run(*train_args(tiny_base, out, "lora.variant=qalora", "lora.merge=qalora", "lora.r=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    folder = inspect(out / "model")
    assert folder.kind is Kind.INT and folder.record["version"] == 4  # float zero points: test_qalora_serve
    model = load(out / "model")
    assert any(getattr(m, "offset", None) is not None for m in model.modules())
    losses = json.loads((out / "qlora_eval.json").read_text())["held_out_loss"]
    assert losses["trained"] < losses["base"]
    assert abs(losses["merged (qalora)"] - losses["trained"]) < 1e-3  # the fold is exact up to rounding
    # The same command again (a job requeued after it finished, or killed after the merge): the same folder.
    written = {f.name: f.read_bytes() for f in (out / "model").iterdir()}
    r = run(*train_args(tiny_base, out, "lora.variant=qalora", "lora.merge=qalora", "lora.r=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert {f.name: f.read_bytes() for f in (out / "model").iterdir()} == written


def test_deepspeed_zero2_two_processes_and_zero3_refused(tiny_base, tmp_path):
    out = tmp_path / "ds"
    args = train_args(tiny_base, out, "distributed.strategy=deepspeed", "distributed.zero_stage=2")
    r = run("-m", "torch.distributed.run", "--nproc_per_node", "2", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "adapters" / "adapter_model.safetensors").is_file()
    ds_file = out / "checkpoints" / "step=8.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"
    state = torch.load(ds_file, weights_only=True, map_location="cpu")
    assert state["module"] and all("lora_" in k for k in state["module"])  # no base in DeepSpeed's files either
    r = run(*train_args(tiny_base, tmp_path / "z3", "distributed.strategy=deepspeed", "distributed.zero_stage=3"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "distributed.zero_stage=3 with train.mode=qlora" in lines[-1], r.stderr[-2000:]


def test_bad_qlora_settings_stop_in_one_line(tiny_base, tmp_path):
    r = run(*train_args(tiny_base, tmp_path / "x", "lora.merge=qalora"))
    assert r.returncode == 2 and "set lora.variant=qalora" in r.stderr.strip().splitlines()[-1]
    r = run(*train_args(tiny_base, tmp_path / "y", "train.teacher_topk=8"))
    assert r.returncode == 2 and "lora.distill=true" in r.stderr.strip().splitlines()[-1]
    r = run(*train_args(tiny_base, tmp_path / "z", "quant.scheme=w4", "lora.variant=qalora"))
    assert r.returncode == 2 and "lora.variant=qalora pools the input by weight group" in r.stderr


def test_optional_distillation_from_the_full_precision_model(tiny_base, tmp_path):
    out = tmp_path / "kd"
    r = run(*train_args(tiny_base, out, "lora.distill=true", "train.ce_weight=1.0", "train.max_steps=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    import csv

    rows = [row for f in sorted(out.glob("logs/version_*/metrics.csv")) for row in csv.DictReader(f.open())]
    kd = [float(row["train/kd"]) for row in rows if row.get("train/kd")]
    ce = [float(row["train/ce"]) for row in rows if row.get("train/ce")]
    assert len(kd) == 4 and len(ce) == 4 and all(v >= 0 for v in kd)

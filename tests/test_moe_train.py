"""QAT of an MoE student end to end on CPU: the teacher writes the data, the student starts from a PTQ of its
experts, trains with gradient checkpointing, logs each expert's load, resumes, and every stage reports coverage."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PUBLISHED
from helpers.models import save_tiny_moe_teacher

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = [f"model.layers.{i}.mlp.experts" for i in range(2)]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, bundled_tokenizer):
    root = tmp_path_factory.mktemp("moe")
    save_tiny_moe_teacher(root / "teacher", bundled_tokenizer)
    return root


def run(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(out: Path) -> list[dict]:
    return [row for f in sorted(out.glob("logs/version_*/metrics.csv")) for row in csv.DictReader(f.open())]


def test_pipeline_on_a_moe_teacher_quantizes_every_expert_and_logs_routing(moe_dir, tmp_path):
    out = tmp_path / "pipe"
    common = [PUBLISHED, f"model.name_or_path={moe_dir / 'teacher'}", "quant.scheme=w4a8kv8",
              "generate.n_samples=32", "generate.max_length=33", "generate.batch_size=16", "generate.shard_size=16",
              "data.seq_len=32", "train.lr=1e-3", "train.warmup_steps=1", "train.micro_batch_size=4",
              "train.save_every=4", "train.val_every=1000", "train.stats_every=2", "train.gradient_checkpointing=true",
              "distributed.strategy=single", "eval.max_tokens=256", "eval.seq_len=32", "train.init=gptq",
              "ptq.n_samples=8", "ptq.seq_len=32", "ptq.progress=false", f"output_dir={out}"]
    r = run("pipeline", *common, "train.max_steps=6")
    assert "coverage: 100.00%" in r.stderr
    rec = json.loads((out / "eval.json").read_text())
    assert set(rec["perplexity"]) == {"fp", "w4a8kv8", "w4a8kv8 (gptq)", "w4a8kv8 (qat)"}
    for label, cov in rec["coverage"].items():
        if label == "fp":
            assert cov["share"] == 0.0
            continue
        assert cov["share"] == 1.0, label
        assert cov["kinds"]["experts"]["share"] == 1.0 and cov["full_precision_apart"]["router"] == 2 * 4 * 64
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["distqat_coverage"]["kinds"]["experts"]["quantized"] == 2 * 4 * (2 * 32 * 64 + 64 * 32)
    rows = metrics(out)
    for name in EXPERTS:
        loads = [[float(row[f"routing/{name}/expert_{e}"]) for e in range(4)]
                 for row in rows if row.get(f"routing/{name}/expert_0")]
        assert loads, "the routing load is logged"
        # each logged row counts the tokens of the steps since the last one: 2 top-k slots per token
        assert all(sum(load) % 2 == 0 and sum(load) > 0 for load in loads)

    # resume: the same pipeline with more steps reuses its data and start and trains on from its last checkpoint
    r = run("pipeline", *common, "train.max_steps=8")
    runs = [sorted({int(row["step"]) for row in csv.DictReader(f.open()) if row.get("train/loss")})
            for f in sorted(out.glob("logs/version_*/metrics.csv"))]
    assert runs[0] == list(range(6)) and runs[-1][-1] == 7 and runs[-1][0] >= 4, runs

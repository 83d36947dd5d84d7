"""`distqat train` end to end on a tiny teacher: checkpoints, kill + resume=auto, the consolidated folder."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import PUBLISHED
from helpers.models import tiny_run_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_dirs(tmp_path_factory, bundled_tokenizer):
    return tiny_run_dir(tmp_path_factory.mktemp("train"), bundled_tokenizer)


def args(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "train", PUBLISHED, f"model.name_or_path={root / 'teacher'}",
            f"data.path={root / 'corpus.txt'}", "data.seq_len=32", "train.max_steps=16", "train.save_every=4",
            "train.keep_last=10", "train.val_every=1000", "train.lr=3e-4", "train.warmup_steps=2",
            "train.micro_batch_size=2", "distributed.strategy=single", f"output_dir={out}",
            "data.val_fraction=0.05", *extra]


def losses(out: Path) -> dict[int, float]:
    found = {}
    for f in sorted(out.glob("logs/version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                found[int(row["step"])] = float(row["train/loss"])
    return found


def test_kill_and_resume_gives_the_same_losses(setup_dirs, tmp_path):
    ref = tmp_path / "ref"
    r = subprocess.run(args(setup_dirs, ref), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = losses(ref)
    assert sorted(expected) == list(range(16))
    logged = list(csv.DictReader(next(ref.glob("logs/version_*/metrics.csv")).open()))
    norms = [float(r["train/grad_norm"]) for r in logged if r.get("train/grad_norm")]
    assert len(norms) == 16 and all(n > 0 for n in norms), "gradient norm logged every step"
    assert any(r.get("train/lr") for r in logged) and any(r.get("train/tokens_per_s") for r in logged)
    assert (ref / "model" / "model.safetensors").is_file()

    out = tmp_path / "killed"
    p = subprocess.Popen(args(setup_dirs, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "step=8.ckpt").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "model").exists(), "killed before the end"
    r = subprocess.run(args(setup_dirs, out), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(out)
    resumed = {s: v for s, v in got.items() if s >= 8}
    assert sorted(resumed) == list(range(8, 16))
    for s in range(8, 16):
        assert got[s] == pytest.approx(expected[s], rel=1e-5, abs=1e-7), f"step {s}"

    from qat.load import load

    a = load(ref / "model", dtype=torch.bfloat16)
    b = load(out / "model", dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(ids).logits, b(ids).logits)

    # `distqat eval` reads the consolidated folder as the trained, fake-quantized model it is.
    import json

    r = subprocess.run([sys.executable, "-m", "trainer", "eval", PUBLISHED, f"model.name_or_path={ref / 'model'}",
                        f"data.path={setup_dirs / 'corpus.txt'}", "eval.max_tokens=64", "eval.seq_len=32",
                        "model.dtype=bfloat16", f"output_dir={tmp_path / 'ev'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ppl = json.loads((tmp_path / "ev" / "eval.json").read_text())["perplexity"]
    assert list(ppl) == ["w4 (saved)"] and ppl["w4 (saved)"] > 1.0


def test_train_from_cached_teacher_topk(setup_dirs, tmp_path):
    out = tmp_path / "topk"
    cache = tmp_path / "home"
    env = {**os.environ, "DISTQAT_HOME": str(cache)}
    r = subprocess.run(args(setup_dirs, out, "train.teacher_topk=8", "train.max_steps=6", "train.save_every=100"),
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher top-8" in r.stderr  # progress of the one teacher pass
    assert len(list(cache.rglob("topk-*.safetensors"))) == 1
    logged = losses(out)
    assert sorted(logged) == list(range(6)) and all(0 < v < 20 for v in logged.values())
    assert (out / "model" / "model.safetensors").is_file()


def pretrained_tiny_teacher(setup_dirs: Path, path: Path) -> Path:
    """The tiny random teacher trained for a moment on the corpus, so that it models the text it is scored
    on (a random teacher's perplexity there is the vocabulary size, for every student alike)."""
    import transformers as tf

    from qat.io.models import load_tokenizer

    tok = load_tokenizer(str(setup_dirs / "teacher"))
    model = tf.AutoModelForCausalLM.from_pretrained(setup_dirs / "teacher", dtype=torch.float32)
    ids = torch.tensor(tok((setup_dirs / "corpus.txt").read_text())["input_ids"])
    blocks = ids[: len(ids) // 32 * 32].reshape(-1, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        batch = blocks[torch.randint(0, len(blocks), (16,), generator=g)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_pipeline_generates_trains_and_scores_fp_rtn_ptq_and_qat(setup_dirs, tmp_path):
    """`distqat pipeline`: the teacher writes the data, QAT trains on it, and FP, the RTN start, the PTQ
    baseline (smoothquant+gptq, calibrated on the generated text, as the student starts from RTN) and the
    trained student are scored on the same windows, with the gap each closes; the student ends closer to the
    teacher than RTN.
    2-bit weights (groups of 16): at 3-4 bits RTN barely moves this tiny model (measured: 5.14 FP,
    4.93-5.00 RTN), at 2 bits it does (9.48), and QAT brings it back (5.73)."""
    import json
    import math

    teacher = pretrained_tiny_teacher(setup_dirs, tmp_path / "teacher")
    out = tmp_path / "pipe"
    r = subprocess.run(
        [sys.executable, "-m", "trainer", "pipeline", PUBLISHED, f"model.name_or_path={teacher}",
         f"data.path={setup_dirs / 'corpus.txt'}", "quant.scheme=w2g16a8kv8", "generate.n_samples=48",
         "generate.max_length=33", "generate.batch_size=16", "generate.shard_size=16", "data.seq_len=32",
         "train.max_steps=24", "train.lr=1e-3", "train.warmup_steps=2", "train.micro_batch_size=4",
         "train.save_every=100", "train.val_every=1000", "distributed.strategy=single",
         "eval.max_tokens=512", "eval.seq_len=32", "ptq.n_samples=8", "ptq.seq_len=32", "ptq.progress=false",
         f"output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "generated" / "manifest.json").read_text())
    assert manifest["samples"] == 48
    assert sorted(losses(out)) == list(range(24))
    rec = json.loads((out / "eval.json").read_text())
    ppl = rec["perplexity"]
    assert list(ppl) == ["fp", "w2g16a8kv8", "w2g16a8kv8 (smoothquant+gptq)", "w2g16a8kv8 (qat)"]
    assert rec["roles"] == {"fp": "fp", "rtn": "w2g16a8kv8", "ptq": "w2g16a8kv8 (smoothquant+gptq)",
                            "qat": "w2g16a8kv8 (qat)"}
    for label, share in rec["gap_closed"].items():
        expected = (math.log(ppl["w2g16a8kv8"]) - math.log(ppl[label])) / (
            math.log(ppl["w2g16a8kv8"]) - math.log(ppl["fp"]))
        assert share == pytest.approx(expected, rel=1e-12), label
    assert rec["gap_closed"]["w2g16a8kv8"] == 0.0
    table = (out / "eval.md").read_text()
    assert "| w2g16a8kv8 (qat) | qat |" in table and f"{100 * rec['gap_closed']['w2g16a8kv8 (qat)']:.0f}%" in table
    assert (out / "baseline" / "init" / "model" / "config.json").is_file()
    assert ppl["fp"] < 20, ppl  # the teacher models the text
    gap_rtn = math.log(ppl["w2g16a8kv8"]) - math.log(ppl["fp"])
    gap_qat = math.log(ppl["w2g16a8kv8 (qat)"]) - math.log(ppl["fp"])
    # QAT closes at least half the gap; on this tiny text it may end below FP (measured -0.05 against RTN's 0.06 on
    # the full signed range), but not by more than RTN's gap
    assert gap_rtn > 0.05 and -gap_rtn < gap_qat < 0.5 * gap_rtn, ppl
    assert (out / "eval.png").is_file() and (out / "model" / "model.safetensors").is_file()

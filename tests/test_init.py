"""Where the QAT student starts (train.init: a PTQ method, a PTQ or AQLM folder) and the block-wise stage."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import PUBLISHED
from helpers.models import tiny_config, tiny_run_dir
from safetensors.torch import load_file

from qat.apply import quantize_model
from qat.keys import HF_QUANT_KEY, PTQ_KEY
from qat.load import Kind, inspect, load
from qat.ptq.blockwise import BlockwiseConfig, reconstruct
from qat.spec import parse

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
AQLM_FAST = dict(num_codebooks=2, nbits_per_codebook=4, beam_size=2, iterations=1, kmeans_iters=3, adam_steps=5)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, bundled_tokenizer):
    return tiny_run_dir(tmp_path_factory.mktemp("init"), bundled_tokenizer)


def train(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "trainer", "train", PUBLISHED, f"model.name_or_path={root / 'teacher'}",
            f"data.path={root / 'corpus.txt'}", "data.seq_len=32", "train.save_every=100", "train.val_every=1000",
            "train.micro_batch_size=2", "distributed.strategy=single", "ptq.n_samples=8", "ptq.seq_len=32",
            "ptq.progress=false", f"output_dir={out}", *extra]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)


def batch(root: Path) -> torch.Tensor:
    from qat.io.models import load_tokenizer

    tok = load_tokenizer(str(root / "teacher"))
    ids = tok((root / "corpus.txt").read_text()[:4000])["input_ids"]
    return torch.tensor(ids[: 4 * 32]).reshape(4, 32)


@torch.no_grad()
def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    return load(path, "float32")(ids).logits


def test_a_ptq_start_trains_from_exactly_the_ptq_model(dirs, tmp_path):
    """train.init=gptq runs GPTQ on the training text first; the student's step 0 is that PTQ model: with both
    learning rates at 0 the trained folder gives the PTQ folder's logits bit for bit, and with them on it
    moves away from them."""
    ids = batch(dirs)
    frozen = tmp_path / "lr0"
    r = train(dirs, frozen, "quant.scheme=w4g32a8kv8", "train.init=gptq", "train.max_steps=2", "train.lr=0",
              "train.quantizer_lr=0")
    assert r.returncode == 0, r.stderr[-3000:]
    start = frozen / "init" / "model"
    assert inspect(start).kind is Kind.PTQ and inspect(start).record["method"] == "gptq"
    assert inspect(frozen / "model").kind is Kind.QAT  # trained: no longer a PTQ result
    ptq_logits = logits(start, ids)
    assert torch.equal(logits(frozen / "model", ids), ptq_logits)
    # The start was calibrated on the training text (and its settings recorded for a rerun to reuse).
    settings = json.loads((frozen / "init" / "start.json").read_text())
    assert settings["data"] == str(dirs / "corpus.txt") and settings["ptq"]["n_samples"] == 8

    trained = tmp_path / "lr"
    r = train(dirs, trained, "quant.scheme=w4g32a8kv8", f"train.init={start}", "train.max_steps=4",
              "train.lr=1e-3", "train.quantizer_lr=1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"starts from {start}" in r.stderr
    assert not torch.equal(logits(trained / "model", ids), ptq_logits)
    w = load_file(trained / "model" / "model.safetensors")
    w0 = load_file(start / "model.safetensors")
    scale = "model.layers.0.self_attn.q_proj.weight_quantizer.scale"
    assert not torch.equal(w[scale], w0[scale])  # the PTQ scales are trained (LSQ), not frozen


def test_build_models_from_a_ptq_folder_makes_every_float_parameter_trainable(dirs, tmp_path):
    from trainer.config import load_config
    from trainer.models import build_models

    r = subprocess.run([sys.executable, "-m", "trainer", "ptq", PUBLISHED, f"model.name_or_path={dirs / 'teacher'}",
                        f"data.path={dirs / 'corpus.txt'}", "quant.scheme=w4g32", "ptq.method=awq",
                        "ptq.n_samples=8", "ptq.seq_len=32", "ptq.progress=false", f"output_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = load_config(PUBLISHED, [f"model.name_or_path={dirs / 'teacher'}", "quant.scheme=w4g32",
                             f"train.init={tmp_path / 'model'}"])
    student, teacher, report = build_models(cfg, tmp_path / "model")
    assert all(p.requires_grad for p in student.parameters())
    assert getattr(student.config, PTQ_KEY, None) is None and student.config.distqat_init["method"] == "awq+rtn"
    ids = batch(dirs)
    with torch.no_grad():
        assert torch.equal(student(ids).logits, logits(tmp_path / "model", ids))
    assert teacher is not None and "starts from" in report


def test_blockwise_lowers_every_blocks_held_out_error():
    """Each block of a tiny W4A8KV8 / W2 student, trained to reproduce its full-precision block, ends with a
    lower error on sequences it never trained on."""
    cls, cfg = tiny_config("llama")
    cfg.num_hidden_layers = 3
    for scheme in ("w4a8kv8", "w2g16"):
        torch.manual_seed(0)
        teacher = cls(cfg).eval()
        teacher_state = copy.deepcopy(teacher.state_dict())
        student = copy.deepcopy(teacher)
        quantize_model(student, parse(scheme))
        ids = torch.randint(cfg.vocab_size, (24, 32), generator=torch.Generator().manual_seed(1))
        report = reconstruct(student, teacher, ids, BlockwiseConfig(steps=40, lr=1e-4, quantizer_lr=1e-4,
                                                                    batch_size=4, held_out=4, progress=False))
        assert report.train_sequences == 20 and report.held_out_sequences == 4
        assert len(report.blocks) == 3
        for b in report.blocks:
            assert b.after < 0.9 * b.before, (scheme, b)
        assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())  # left as it was


def test_blockwise_puts_back_a_block_it_made_worse():
    """A learning rate that wrecks the blocks: each comes back exactly as it was, its error unchanged."""
    cls, cfg = tiny_config("llama")
    torch.manual_seed(0)
    teacher = cls(cfg).eval()
    student = copy.deepcopy(teacher)
    quantize_model(student, parse("w4a8kv8"))
    before = copy.deepcopy(student.state_dict())
    ids = torch.randint(cfg.vocab_size, (12, 16), generator=torch.Generator().manual_seed(1))
    report = reconstruct(student, teacher, ids, BlockwiseConfig(steps=5, lr=0.5, quantizer_lr=0.5, batch_size=4,
                                                                held_out=4, progress=False))
    assert all(b.after == b.before for b in report.blocks)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_blockwise_stage_in_train_writes_its_report_and_the_student_starts_there(dirs, tmp_path):
    out = tmp_path / "bw"
    r = train(dirs, out, "quant.scheme=w2g16a8kv8", "train.blockwise.steps=20", "train.blockwise.samples=12",
              "train.blockwise.seq_len=32", "train.blockwise.held_out=4", "train.blockwise.lr=1e-3",
              "train.max_steps=1", "train.lr=0", "train.quantizer_lr=0")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "blockwise" / "blockwise_report.json").read_text())
    assert rep["train_sequences"] == 8 and rep["held_out_sequences"] == 4
    assert all(b["after"] <= b["before"] for b in rep["blocks"])
    assert any(b["after"] < b["before"] for b in rep["blocks"])
    ids = batch(dirs)
    assert torch.equal(logits(out / "model", ids), logits(out / "blockwise" / "model", ids))
    # A rerun with the same settings reuses the stage; other settings rebuild it.
    r = train(dirs, out, "quant.scheme=w2g16a8kv8", "train.blockwise.steps=20", "train.blockwise.samples=12",
              "train.blockwise.seq_len=32", "train.blockwise.held_out=4", "train.blockwise.lr=1e-3",
              "train.max_steps=2", "train.lr=0", "train.quantizer_lr=0", "train.resume=never")
    assert r.returncode == 0 and "block-wise reconstruction" not in r.stderr, r.stderr[-3000:]
    r = train(dirs, out, "quant.scheme=w2g16a8kv8", "train.blockwise.steps=5", "train.blockwise.samples=12",
              "train.blockwise.seq_len=32", "train.blockwise.held_out=4", "train.max_steps=2",
              "train.resume=never")
    assert r.returncode == 0 and "block-wise reconstruction" in r.stderr, r.stderr[-3000:]


def test_a_rotated_start_trains_from_its_ptq_model_and_blockwise_turns_the_teacher(dirs, tmp_path):
    """train.init=rotate+gptq: the init folder records the rotation, its logits stay near the teacher's (the turn
    is exact; only the quantization differs), the block-wise stage compares its blocks with the teacher turned the
    same way (each starts at a quantization-sized error), and with lr 0 the trained folder is that start."""
    out = tmp_path / "rot"
    r = train(dirs, out, "quant.scheme=w4g32a8kv8", "train.init=rotate+gptq", "train.blockwise.steps=5",
              "train.blockwise.samples=12", "train.blockwise.seq_len=32", "train.blockwise.held_out=4",
              "train.blockwise.lr=1e-4", "train.max_steps=1", "train.lr=0", "train.quantizer_lr=0")
    assert r.returncode == 0, r.stderr[-3000:]
    start = out / "init" / "model"
    record = inspect(start).record
    assert record["method"] == "rotate+gptq" and record["rotate"]["kind"] == "hadamard"
    ids = batch(dirs)
    from qat.io.models import load_model

    with torch.no_grad():
        teacher = load_model(str(dirs / "teacher"), "float32")(ids).logits
    ptq = logits(start, ids)
    assert (ptq - teacher).pow(2).mean() < 0.05 * teacher.pow(2).mean()
    rep = json.loads((out / "blockwise" / "blockwise_report.json").read_text())
    signal = [b["before"] for b in rep["blocks"]]
    assert all(b["after"] <= b["before"] for b in rep["blocks"]) and max(signal) < 0.1, signal
    assert torch.equal(logits(out / "model", ids), logits(out / "blockwise" / "model", ids))


def test_aqlm_start_finetunes_codebooks_and_scales_with_codes_frozen(dirs, tmp_path):
    """AQLM + KD: train.init=aqlm codes the model first, then distillation trains only its codebooks and scales;
    the folder it writes is still an AQLM folder (transformers' layout) whose logits are the student's, and it
    is closer to the teacher than the AQLM start on the training text."""
    knobs = [f"ptq.aqlm.{k}={v}" for k, v in AQLM_FAST.items()]
    out = tmp_path / "aqlm"
    r = train(dirs, out, "quant.scheme=w2", "train.init=aqlm", "train.max_steps=12", "train.lr=3e-4",
              "train.warmup_steps=0", *knobs)
    assert r.returncode == 0, r.stderr[-3000:]
    start, trained = out / "init" / "model", out / "model"
    assert inspect(trained).kind is Kind.AQLM
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg[HF_QUANT_KEY]["quant_method"] == "aqlm" and cfg["distqat_aqlm"]["finetuned"] is True
    w0, w = load_file(start / "model.safetensors"), load_file(trained / "model.safetensors")
    assert w0.keys() == w.keys()
    changed = {k for k in w if not torch.equal(w[k], w0[k])}
    assert changed and all(k.endswith((".codebooks", ".scales")) for k in changed), sorted(changed)[:4]
    assert any(k.endswith(".codebooks") for k in changed) and any(k.endswith(".scales") for k in changed)
    ids = batch(dirs)
    teacher = load(dirs / "teacher", "float32")
    with torch.no_grad():
        t = F.log_softmax(teacher(ids).logits, -1)

        def kl(path: Path) -> float:
            s = F.log_softmax(load(path, "float32")(ids).logits, -1)
            return float((t.exp() * (t - s)).sum(-1).mean())

        assert kl(trained) < kl(start)
    # Neither convert nor QLoRA takes an AQLM folder; each says what to do with one instead.
    from qat.export.convert import convert_folder
    from qat.export.format import FormatError
    from qat.qlora.base import build_base

    with pytest.raises(FormatError, match="is an AQLM folder .* deployment format already"):
        convert_folder(trained, tmp_path / "int")
    with pytest.raises(ValueError, match="is an AQLM folder: .* train.init=<that folder>"):
        build_base(trained, None)


@pytest.mark.parametrize("extra, names", [
    (["train.init=llm_int8"], ("train.init=llm_int8", "full-precision")),
    (["train.init=/nowhere/ptq"], ("train.init='/nowhere/ptq'", "existing folder")),
    (["train.init=gptq", "train.mode=qlora", "quant.scheme=w4g32"], ("train.init", "train.mode=qlora")),
])
def test_bad_starts_fail_in_one_line_before_any_work(dirs, tmp_path, extra, names):
    r = train(dirs, tmp_path / "bad", "quant.scheme=w4g32", "train.max_steps=1", *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("distqat train: error:") and all(n in last for n in names), last
    assert not (tmp_path / "bad" / "init").exists()


def test_a_start_folder_of_another_spec_or_model_is_refused(dirs, tmp_path):
    r = subprocess.run([sys.executable, "-m", "trainer", "ptq", PUBLISHED, f"model.name_or_path={dirs / 'teacher'}",
                        f"data.path={dirs / 'corpus.txt'}", "quant.scheme=w4g32", "ptq.method=rtn",
                        f"output_dir={tmp_path / 'p'}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    r = train(dirs, tmp_path / "bad", "quant.scheme=w2g16", f"train.init={tmp_path / 'p' / 'model'}")
    assert r.returncode == 2 and "was quantized as w4g32" in r.stderr and "w2g16" in r.stderr, r.stderr[-2000:]
    r = train(dirs, tmp_path / "bad", "quant.scheme=w4g32", f"train.init={dirs / 'teacher'}")
    assert r.returncode == 2 and "base model" in r.stderr and "train.init=rtn" in r.stderr, r.stderr[-2000:]


def test_the_pipelines_ptq_row_for_an_rtn_start_is_the_first_method_the_spec_takes():
    from trainer.config import load_config
    from trainer.pipeline import baseline_method

    def method(scheme: str):
        return baseline_method(load_config(PUBLISHED, [f"quant.scheme={scheme}"]))

    assert method("w4a8kv8") == "smoothquant+gptq"  # activations quantized: SmoothQuant applies
    assert method("w3g64") == "gptq"  # weight-only: nothing for SmoothQuant to migrate
    assert method("fp8") == "smoothquant+rtn"  # GPTQ has no fp8 grid

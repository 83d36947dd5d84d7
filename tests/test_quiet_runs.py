"""Quiet, honest runs: no library noise on a run's output, steady progress lines where stderr is a log, and
master_weights=auto keeping fp32 masters on CPU (saved in the dtype it trained in), and when train.autocast
computes in bf16."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher
from safetensors import safe_open

from qat.io.progress import ProgressLines, duration
from trainer import optim
from trainer.callbacks import TrainProgress
from trainer.config import load_config
from trainer.optim import lightning_precision, resolve_master_weights
from trainer.strategy import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]

# What the libraries printed on a first run, and said nothing a user could act on.
NOISE = ("Tip:", "litlogger", "litmodels", "eval mode", "LeafSpec", "past_key_values", "Setting accelerator",
         "untested optimizer", "FutureWarning", "DeprecationWarning")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, bundled_tokenizer):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"), bundled_tokenizer, max_positions=256,
                             init_range=0.1)


def drive(callback: TrainProgress, steps: int, step_s, grad_accum: int = 2, world: int = 2, rank: int = 0,
          stop_at: int | None = None) -> SimpleNamespace:
    """Run the callback through `steps` optimizer steps of `grad_accum` micro-batches of 4 x 256 tokens, step k
    taking step_s(k) seconds on the callback's clock and having loss k."""
    clock = callback.clock.__self__  # the FakeClock
    trainer = SimpleNamespace(max_steps=steps, global_step=0, world_size=world, is_global_zero=rank == 0)
    callback.on_train_start(trainer, None)
    for k in range(1, (stop_at or steps) + 1):
        clock.now += step_s(k)
        for micro in range(grad_accum):
            if micro == grad_accum - 1:
                trainer.global_step = k
            batch = {"input_ids": torch.zeros(4, 256, dtype=torch.long)}
            callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(k / grad_accum)}, batch, micro)
    callback.on_train_end(trainer, None)
    return trainer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def test_progress_lines_at_the_configured_rate_with_tokens_per_s_and_eta():
    out = io.StringIO()
    cb = TrainProgress(every_s=30, stream=out, clock=FakeClock().time)
    # A slow first step (start-up), then 10 s a step. Each step: 2 micro-batches x 1,024 tokens x 2 ranks.
    drive(cb, 10, lambda k: 20 if k == 1 else 10)
    assert out.getvalue().splitlines() == [
        # 4,096 tokens in 20 s; the ETA from the only rate known yet, 20 s a step
        "train: step 1/10 (10%) | loss 1.000 | 205 tokens/s | elapsed 20s | ETA 3m00s",
        # 30 s after the first line; loss: mean of steps 2-4; ETA from the rate since the last line (10 s a step),
        # not the average since the start (12.5 s)
        "train: step 4/10 (40%) | loss 3.000 | 328 tokens/s | elapsed 50s | ETA 1m00s",
        "train: step 7/10 (70%) | loss 6.000 | 358 tokens/s | elapsed 1m20s | ETA 30s",
        "train: step 10/10 (100%) | loss 9.000 | 372 tokens/s | elapsed 1m50s",  # the last step, no ETA
    ]


def test_progress_every_step_when_the_interval_is_zero_a_final_line_on_an_early_stop_and_none_off_rank_0():
    out = io.StringIO()
    drive(TrainProgress(every_s=0, stream=out, clock=FakeClock().time), 3, lambda k: 1, grad_accum=1, world=1)
    assert [line.split(" | ")[0] for line in out.getvalue().splitlines()] == [
        "train: step 1/3 (33%)", "train: step 2/3 (66%)", "train: step 3/3 (100%)"]
    out = io.StringIO()
    # Stopped at step 5 of 10 (max_time): the first line, then the one training's end adds.
    drive(TrainProgress(every_s=3600, stream=out, clock=FakeClock().time), 10, lambda k: 10, stop_at=5)
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["train: step 1/10 (10%)", "train: step 5/10 (50%)"]
    assert lines[1].endswith("loss 3.500 | 410 tokens/s | elapsed 50s | ETA 50s")
    out = io.StringIO()
    drive(TrainProgress(every_s=0, stream=out, clock=FakeClock().time), 3, lambda k: 1, rank=1)
    assert out.getvalue() == ""


def test_durations_and_a_count_without_tokens():
    assert [duration(s) for s in (0, 42.4, 65, 3599, 3600, 7380)] == ["0s", "42s", "1m05s", "59m59s", "1h00m",
                                                                         "2h03m"]
    clock, out = FakeClock(), io.StringIO()
    lines = ProgressLines("generate", 1000, 30, unit="samples", stream=out, clock=clock.time)
    clock.now += 5
    assert lines.update(10) == "generate: samples 10/1,000 (1%) | elapsed 5s | ETA 8m15s"
    clock.now += 1
    assert lines.update(20) is None  # 1 s since the last line: not due


def test_master_weights_auto_follows_the_device_and_given_ones_stand(monkeypatch):
    cpu = load_config(PUBLISHED, ["distributed.strategy=deepspeed"])
    assert cpu.train.master_weights == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(optim, "cpu_multiplies_bf16", lambda: False)
    assert resolve_master_weights("auto") == "fp32" and lightning_precision("fp32") == "32-true"
    assert "bf16" not in deepspeed_config(cpu.distributed, cpu.train)  # fp32 ZeRO: bf16 compute is slow on CPU
    asked = load_config(PUBLISHED, ["distributed.strategy=deepspeed", "train.master_weights=bf16"])
    assert resolve_master_weights("bf16") == "bf16" and lightning_precision("bf16") == "bf16-true"
    assert deepspeed_config(asked.distributed, asked.train)["bf16"] == {
        "enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_master_weights("auto") == "bf16" and resolve_master_weights("fp32") == "fp32"
    assert lightning_precision("fp32") == "bf16-mixed"  # classic mixed precision on a GPU
    assert deepspeed_config(cpu.distributed, cpu.train)["bf16"]["bf16_master_weights_and_grads"] is True
    # DeepSpeed offloads bf16 masters only with its own CPU Adam: auto takes fp32 there, a given bf16 is refused.
    offload = load_config(PUBLISHED, ["distributed.strategy=deepspeed", "distributed.offload_optimizer=true"])
    assert resolve_master_weights("auto", offload=True) == "fp32"
    assert deepspeed_config(offload.distributed, offload.train)["bf16"] == {"enabled": True}
    offload.train.master_weights = "bf16"
    with pytest.raises(ValueError, match="master_weights=fp32 or auto"):
        deepspeed_config(offload.distributed, offload.train)


@pytest.mark.parametrize("master", ["auto", "fp32", "bf16"])
def test_the_student_is_built_in_its_master_weights_dtype(teacher, master):
    from trainer.models import build_models

    dtype = torch.bfloat16 if master == "bf16" or (master == "auto" and torch.cuda.is_available()) else torch.float32

    cfg = load_config(PUBLISHED, [f"model.name_or_path={teacher}", "quant.scheme=w4a8kv8",
                             f"train.master_weights={master}"])
    student, frozen, _ = build_models(cfg)
    assert {p.dtype for n, p in student.named_parameters() if "_quantizer" not in n} == {dtype}
    if not torch.cuda.is_available():
        assert next(frozen.parameters()).dtype == torch.float32  # the teacher: fp32 on CPU either way


def test_generate_writes_lines_to_a_log_and_passes_the_cache_by_its_current_name(teacher, tmp_path, capfd,
                                                                                  monkeypatch):
    from trainer.cli import main

    monkeypatch.delenv("DISTQAT_PROGRESS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["generate", PUBLISHED,
                     f"model.name_or_path={teacher}", "model.dtype=float32", f"generate.out_dir={tmp_path}",
                     "generate.n_samples=6", "generate.max_length=16", "generate.batch_size=2",
                     "generate.progress_every_s=0"]) == 0
    err = capfd.readouterr().err
    assert not [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    lines = [line for line in err.splitlines() if line.startswith("generate: ")]
    assert [line.split(" | ")[0] for line in lines] == [
        "generate: samples 2/6 (33%)", "generate: samples 4/6 (66%)", "generate: samples 6/6 (100%)"]
    assert "tokens/s" in lines[0] and "ETA" in lines[0] and "ETA" not in lines[-1]
    assert "\r" not in err and "past_key_values" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path (auto is bf16 on CUDA)")
def test_a_deepspeed_cpu_run_is_quiet_trains_in_fp32_and_saves_what_it_trained(teacher, tmp_path):
    """The w4a8kv8 recipe (ZeRO-2) on the tiny model, as a user starts it, output to a log (not a terminal)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i} of a small corpus, for a tiny run." for i in range(200)))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("DISTQAT_PROGRESS", "DS_ACCELERATOR")}
    r = subprocess.run([sys.executable, "-m", "trainer", "train", "configs/llm_qat/w4a8kv8.yaml",
                        f"model.name_or_path={teacher}", f"data.path={corpus}", "data.seq_len=32", "train.max_steps=3",
                        "train.micro_batch_size=2", "train.progress_every_s=0", f"output_dir={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    said = r.stdout + r.stderr
    assert [n for n in NOISE if n in said] == [], said[-3000:]
    assert "\r" not in said  # no bar fragments in a log
    assert "initializing deepspeed distributed" in r.stderr  # it did run under DeepSpeed
    assert "trained in float32" in r.stderr
    progress = [line for line in r.stderr.splitlines() if line.startswith("train: step")]
    assert [line.split(" | ")[0] for line in progress] == [
        "train: step 1/3 (33%)", "train: step 2/3 (66%)", "train: step 3/3 (100%)"]
    assert all(" | loss " in line and " tokens/s | elapsed " in line for line in progress)
    assert "master_weights: fp32" in (out / "config.yaml").read_text()  # what auto resolved to
    with safe_open(str(out / "model" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_perplexity_prints_whole_lines_not_a_bar_to_a_log(teacher, capfd, monkeypatch):
    from transformers import AutoModelForCausalLM

    from trainer.eval import perplexity

    monkeypatch.delenv("DISTQAT_PROGRESS", raising=False)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    windows = [list(range(5 + i, 37 + i)) for i in range(3)]
    ppl = perplexity(model, windows, desc="fp")
    err = capfd.readouterr().err
    # One line at the first window (30 s between lines; the caller prints the result at the end), no bar.
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fp: tokens 32/96 (33%) | ") and "tokens/s" in lines[0], err
    assert ppl == perplexity(model, windows, progress=False)


@pytest.mark.parametrize("cuda, hw_bf16, autocast, deepspeed, want", [
    (False, True, "auto", False, "bf16-mixed"),  # AVX512-BF16 / AMX: bf16 matmuls are the fast ones
    (False, False, "auto", False, "32-true"),  # emulated bf16 is no faster than fp32
    (False, True, "auto", True, "32-true"),  # DeepSpeed on CPU: fp32 ZeRO, the path tested there
    (False, True, "never", False, "32-true"),
    (False, False, "always", False, "bf16-mixed"),  # asked for: given
    (True, False, "auto", True, "bf16-mixed"),
    (True, False, "never", False, "32-true"),
])
def test_autocast_follows_the_machine_unless_given(monkeypatch, cuda, hw_bf16, autocast, deepspeed, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(optim, "cpu_multiplies_bf16", lambda: hw_bf16)
    assert lightning_precision("fp32", autocast, deepspeed=deepspeed) == want
    assert lightning_precision("bf16", autocast, deepspeed=deepspeed) == "bf16-true"  # bf16 masters: no autocast


def test_autocast_on_under_deepspeed_on_cpu_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="train.autocast=auto or never, or distributed.strategy=ddp"):
        lightning_precision("fp32", "always", deepspeed=True)


def test_cpu_precision_bench_prints_both_tables(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import cpu_precision

    assert cpu_precision.main(["--shape", "tiny", "--steps", "1", "--batch", "1", "--seq", "16"]) == 0
    out = capsys.readouterr().out
    assert "bf16 dot-product instructions" in out and "head 16x64 @ 64x512" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith(("32-true", "bf16-"))}
    assert rows["32-true"][-1] == "1.000" and float(rows["bf16-mixed"][-1]) > 0

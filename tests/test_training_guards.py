"""Training stops on the first non-finite loss, naming where it began, and writes no model; a run killed
between saving a checkpoint and pruning the oldest is cleaned up by the next one."""

from __future__ import annotations

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
from safetensors.torch import load_file, save_file

from trainer.callbacks import CtrlC

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, bundled_tokenizer):
    return tiny_run_dir(tmp_path_factory.mktemp("guards"), bundled_tokenizer)


def train(dirs, model, out, *extra):
    return [sys.executable, "-m", "trainer", "train", PUBLISHED, f"model.name_or_path={model}",
            f"data.path={dirs / 'corpus.txt'}", "data.seq_len=32", "train.max_steps=6", "train.save_every=2",
            "train.keep_last=2", "train.val_every=1000", "train.micro_batch_size=2", "train.lr=3e-4",
            "distributed.strategy=single", f"output_dir={out}", *extra]


def run(args, timeout=600):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)


def nan_model(dirs) -> Path:
    """The tiny teacher with one NaN in layer 0's down_proj."""
    folder = dirs / "nan"
    if not folder.exists():
        subprocess.run(["cp", "-r", str(dirs / "teacher"), str(folder)], check=True)
        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_nan_weight_stops_training_at_step_0_naming_its_module(dirs, tmp_path):
    out = tmp_path / "nan"
    r = run(train(dirs, nan_model(dirs), out))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2, r.stderr[-3000:]
    assert last.startswith("distqat train: error: step 0: the loss is not finite")
    assert "student model.layers.0.mlp.down_proj" in last and "train.skip_nonfinite" in last
    assert "Traceback" not in r.stderr
    assert not (out / "model").exists() and not list((out / "checkpoints").glob("step=*"))


def test_skip_nonfinite_skips_that_many_batches_then_stops(dirs, tmp_path):
    r = run(train(dirs, nan_model(dirs), tmp_path / "skip", "train.skip_nonfinite=2"))
    assert r.returncode == 2
    assert r.stderr.count("batch skipped") == 2 and "of train.skip_nonfinite=2" in r.stderr
    assert "the loss is not finite" in r.stderr.strip().splitlines()[-1]


def _logged(out: Path, step: int) -> bool:
    """Whether a metrics.csv of the run holds a train/loss row for `step`."""
    import csv

    return any(row.get("train/loss") and row.get("step") == str(step)
               for f in out.glob("logs/version_*/metrics.csv") for row in csv.DictReader(f.open()))


def test_the_next_run_prunes_what_a_killed_one_left_and_finishes(dirs, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(train(dirs, dirs / "teacher", out, "train.max_steps=40"), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # Killed once step 4's checkpoint and step 3's CSV row are both on disk. Lightning writes a step's checkpoint
    # before it logs that step, so a kill in the instant between them loses that one row (trainer/train.py
    # _loggers); this test is about what the kill leaves behind, not that instant.
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "checkpoints" / "step=4.ckpt").exists() and _logged(out, 3)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = out / "checkpoints"
    assert (ckpts / "step=4.ckpt").exists()
    # What a kill between a checkpoint's save and the pruning of the oldest leaves, on top of the real kill:
    # one checkpoint too many, and the temp folder and file of an atomic write.
    saved = sorted(ckpts.glob("step=*.ckpt"))
    (ckpts / "step=0.ckpt").write_bytes(saved[0].read_bytes())
    (out / ".model.tmp-abcd1234").mkdir()
    (out / ".config.abcd1234.yaml").write_text("half")
    r = run(train(dirs, dirs / "teacher", out, "train.max_steps=8"))
    assert r.returncode == 0, r.stderr[-3000:]
    steps = sorted(int(p.stem.split("=")[1]) for p in ckpts.glob("step=*.ckpt"))
    assert steps == [6, 8]  # keep_last=2
    assert not list(out.glob(".*tmp*")) and not (out / ".config.abcd1234.yaml").exists()
    assert (out / "model" / "config.json").is_file()
    assert "not resumable" not in r.stderr  # the data order is restored: no false warning
    # The CSV log has every step once after the resume (rows flushed with each checkpoint).
    import csv

    rows = [row for f in sorted(out.glob("logs/version_*/metrics.csv")) for row in csv.DictReader(f.open())]
    logged = sorted({int(row["step"]) for row in rows if row.get("train/loss")})
    assert logged == list(range(8))


def test_a_truncated_newest_checkpoint_is_named_with_the_fix(dirs, tmp_path):
    out = tmp_path / "trunc"
    assert run(train(dirs, dirs / "teacher", out, "train.max_steps=4")).returncode == 0
    newest = out / "checkpoints" / "step=4.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    r = run(train(dirs, dirs / "teacher", out, "train.max_steps=6"))
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "step=4.ckpt" in last and "train.resume=never" in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    torch.load(out / "checkpoints" / "step=2.ckpt", weights_only=True)  # the one before is still whole


@pytest.mark.parametrize("command", ["train", "generate"])
def test_ctrl_c_ends_in_one_distqat_line_after_the_progress_bars(command, dirs, tmp_path):
    out = tmp_path / command
    args = train(dirs, dirs / "teacher", out, "train.max_steps=400") if command == "train" else [
        sys.executable, "-m", "trainer", "generate", PUBLISHED, f"model.name_or_path={dirs / 'teacher'}",
        "model.dtype=float32",
        f"generate.out_dir={out}", "generate.n_samples=4000", "generate.max_length=64", "generate.batch_size=4",
        "generate.shard_size=8"]
    # A suite started in the background of a shell without job control inherits SIGINT ignored, and so would the
    # child: give it the default disposition a user's terminal gives, so ctrl-C is what it receives.
    proc = subprocess.Popen(args, cwd=ROOT, env={**ENV, "DISTQAT_PROGRESS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Under way: the first checkpoint, or the first shard. The moment the first checkpoint appears is when a
    # ctrl-C used to be lost (3 of 5 tries before trainer.callbacks.CtrlC): Lightning's checkpoint save leaves
    # an fsspec file to the garbage collector, whose finalizer swallowed the KeyboardInterrupt.
    def started() -> bool:
        if command == "generate":
            return (out / "shard-00000.parquet").exists()
        return any(out.glob("checkpoints/step=*.ckpt"))

    deadline = time.time() + 300
    while time.time() < deadline and not started():
        time.sleep(0.01)  # within 10 ms of it: a coarser poll let the lost ctrl-C above pass unseen
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err.rstrip().splitlines()[-1] == f"distqat {command}: interrupted"
    assert "Traceback" not in err
    assert not (out / "model").exists() and not (out / "manifest.json").exists()


def test_a_ctrl_c_whose_keyboard_interrupt_was_swallowed_still_stops_at_the_next_batch():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever ran pytest
    guard = CtrlC()
    try:
        guard.install()
        assert signal.getsignal(signal.SIGINT) == guard._handler
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between these bytecodes
                time.sleep(0.001)
            raise AssertionError("SIGINT was not handled")
        except KeyboardInterrupt:
            pass  # swallowed, as CPython does when a finalizer raises
        assert guard.pending
        with pytest.raises(KeyboardInterrupt):
            guard.on_train_batch_start(None, None, None, 0)
        with pytest.raises(KeyboardInterrupt):
            guard.on_train_batch_end(None, None, None, None, 0)
        guard.uninstall()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # A process that ignores SIGINT (started in the background without job control) keeps ignoring it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ignoring = CtrlC()
        ignoring.install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and not ignoring.pending
        ignoring.on_train_batch_start(None, None, None, 0)  # nothing pending: no raise
    finally:
        signal.signal(signal.SIGINT, before)

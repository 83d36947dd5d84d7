"""A stop signal during `ptq` keeps the blocks it finished: the current block ends, the finished blocks and the next
block's calibration inputs are written whole, the command exits 75, and the rerun continues from the next block to
the folder an uninterrupted run writes, bit for bit. A different job in the same folder does not take them."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher
from safetensors.torch import load_file

import qat.ptq.loop as loop
from qat.ptq.progress import BlockProgress
from trainer.cli import main
from trainer.commands import PTQ_PROGRESS_DIR


@pytest.fixture(scope="module")
def base(tmp_path_factory, bundled_tokenizer):
    d = tmp_path_factory.mktemp("ptqstop")
    save_tiny_teacher(d / "teacher", bundled_tokenizer, init_range=0.1)
    (d / "text.txt").write_text("\n".join(f"Line {i} of a small calibration text, for a tiny model." for i in
                                          range(300)))
    return d


def ptq(d: Path, out: Path, method: str) -> list[str]:
    return ["ptq", PUBLISHED, f"model.name_or_path={d / 'teacher'}", f"ptq.method={method}", "quant.scheme=w4g32",
            f"data.path={d / 'text.txt'}", "ptq.n_samples=4", "ptq.seq_len=32", f"output_dir={out}"]


def signal_during_block(monkeypatch, n: int, signum: int = signal.SIGTERM) -> None:
    """Block n (0-based) receives the stop signal while it is being quantized."""
    real, calls = loop._quantize_block, []

    def block(*a, **k):
        calls.append(1)
        if len(calls) == n + 1:
            os.kill(os.getpid(), signum)
        return real(*a, **k)
    monkeypatch.setattr(loop, "_quantize_block", block)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_a_stopped_ptq_keeps_its_finished_blocks_and_the_rerun_ends_bit_exact(base, tmp_path, method, capsys,
                                                                               monkeypatch):
    ref = tmp_path / "ref"
    assert main(ptq(base, ref, method)) == 0
    capsys.readouterr()

    out = tmp_path / "stopped"
    signal_during_block(monkeypatch, 0)
    assert main(ptq(base, out, method)) == 75
    monkeypatch.undo()
    progress = out / PTQ_PROGRESS_DIR / "blocks.pt"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"distqat ptq: stopped by SIGTERM; blocks 1-1 of 2 kept in {progress}; the same command continues from "
        "block 2 (exit 75)")
    assert progress.is_file() and not (out / "model").exists() and not (out / "ptq_report.json").exists()
    assert not [p for p in out.rglob(".*") if p.name != ".distqat.lock"]

    assert main(ptq(base, out, method)) == 0
    assert f"blocks 1-1 of 2 as a stopped run left them ({progress})" in capsys.readouterr().err
    assert not (out / PTQ_PROGRESS_DIR).exists()  # the finished run needs it no more
    a, b = load_file(str(ref / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((o / "ptq_report.json").read_text()) for o in (ref, out))
    assert [x["name"] for x in ra["layers"]] == [x["name"] for x in rb["layers"]]
    assert [x["algorithm"] for x in ra["layers"]] == [x["algorithm"] for x in rb["layers"]]


def test_another_jobs_blocks_are_not_taken(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    signal_during_block(monkeypatch, 0, signal.SIGUSR1)
    assert main(ptq(base, out, "gptq")) == 75
    monkeypatch.undo()
    assert main([*ptq(base, out, "gptq"), "ptq.seed=7"]) == 0  # other calibration samples: another job
    assert "as a stopped run left them" not in capsys.readouterr().err
    assert BlockProgress(out / PTQ_PROGRESS_DIR, "x").load() is None

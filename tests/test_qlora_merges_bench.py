"""bench/qlora_merges.py on a tiny QLoRA run: its rows score what the run itself scored (the same held-out blocks, the
same calibration for lora.requant=gptq-grid), and the table says the share of the gain each merge kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher

from bench import qlora_merges

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, bundled_tokenizer):
    root = tmp_path_factory.mktemp("qlora_merges")
    base = save_tiny_teacher(root / "base", bundled_tokenizer, max_positions=256, init_range=0.1)
    out = root / "run"
    args = ["-m", "trainer", "train", PUBLISHED, f"model.name_or_path={base}", "quant.scheme=w4g32", "train.mode=qlora",
            "data.path=bundled:instructions", "data.format=instructions", "data.seq_len=64", "train.max_steps=8",
            "train.micro_batch_size=2", "train.lr=2e-3", "train.save_every=8", "train.val_every=1000", "lora.r=4",
            "distributed.strategy=single", "ptq.n_samples=8", "lora.merge=requant", "lora.requant=gptq-grid",
            f"output_dir={out}"]
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_rows_score_what_the_run_scored_and_the_table_gives_the_share_kept(tiny_run, tmp_path, capsys):
    run_losses = json.loads((tiny_run / "qlora_eval.json").read_text())["held_out_loss"]
    report = json.loads((tiny_run / "merge_report.json").read_text())
    assert report["merge"] == "requant-gptq-grid" and all(r["algorithm"] == "gptq-grid" for r in report["layers"])
    out = tmp_path / "rows.json"
    assert qlora_merges.main(["--run", str(tiny_run), "--rows", "base,qlora,gptq-grid", "--blocks", "64",
                              "--per-task", "2", "--json", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text())}
    assert rows["base"]["held_out_loss"] == pytest.approx(run_losses["base"], rel=1e-6)
    assert rows["qlora"]["held_out_loss"] == pytest.approx(run_losses["trained"], rel=1e-6)
    assert rows["gptq-grid"]["held_out_loss"] == pytest.approx(run_losses["merged (requant)"], rel=1e-6)
    assert all(r["questions"] == 4 and 0 <= r["exact_match"] <= 1 for r in rows.values())
    capsys.readouterr()
    assert qlora_merges.main(["--table", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    base, trained, grid = (rows[k]["held_out_loss"] for k in ("base", "qlora", "gptq-grid"))
    kept = f"{100 * (base - grid) / (base - trained):.0f}%"
    assert lines[0].startswith("| row |") and any(ln.startswith("| gptq-grid |") and f"| {kept} |" in ln
                                                  for ln in lines)


def test_refuses_a_folder_without_adapters(tmp_path, capsys):
    assert qlora_merges.main(["--run", str(tmp_path), "--rows", "base"]) == 2
    assert "give --run <a finished QLoRA run folder>" in capsys.readouterr().err

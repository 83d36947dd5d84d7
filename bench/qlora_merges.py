"""Benchmark: how much of what QLoRA training gained each merge keeps, on the bundled instruction set's held-out split.

    python -m bench.qlora_merges --run runs/qlora_int4 [--rows base,qlora,rtn,gptq,gptq-grid,gptq-keep,fp]
        [--blocks 16] [--per-task 20] [--calib-blocks N] [--damp D] [--json out.json]

`--run` is a finished `distqat train train.mode=qlora` folder (its `adapters/` and `config.yaml`, any lora.merge).
Each row is scored on the same held-out blocks (cross-entropy on the assistant tokens of `--blocks` blocks of the
test split, as the run's own held-out loss) and on greedy answers to `--per-task` title and section questions of
the test split (normalized exact match, `trainer.instruct_eval`):
  base        the packed base, adapters off             qlora      the adapters on the packed base
  qalora      lora.merge=qalora (QA-LoRA adapters only)  fp         base + adapter unrounded (lora.merge=bf16's
  rtn, gptq, gptq-grid, gptq-keep   lora.merge=requant      weights, kept in fp32)
                with that lora.requant (calibrated ones on the run's first ptq.n_samples training blocks)
`kept` is (base - row) / (base - qlora) of the held-out loss: the share of the training gain the row keeps.
Each row builds the base and loads the adapters afresh, so rows can run in separate processes (`--json` per row,
then `--table a.json b.json ...` prints them together).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from data.blocks import BlockData
from qat.io.models import load_tokenizer
from qat.qlora.adapters import load_adapters
from qat.qlora.base import build_base
from qat.qlora.config import CALIBRATED_REQUANT
from qat.qlora.merge import merge_bf16, merge_qalora, merge_requant
from trainer.config import load_config
from trainer.instruct_eval import evaluate_instructions, held_out_questions
from trainer.qlora import HELD_OUT_BLOCKS, held_out, held_out_loss

ROWS = ("base", "qlora", "qalora", "rtn", "gptq", "gptq-grid", "gptq-keep", "fp")


def _model(row: str, run: Path, cfg, dm: BlockData, calib_blocks: Optional[int], damp: Optional[float]):
    base, _ = build_base(cfg.model.name_or_path, cfg.quant, cfg.model.dtype, cfg.model.attn_implementation, False,
                         cfg.lora.double_quant)
    peft = load_adapters(base, run / "adapters")
    if row in ("base", "qlora"):
        return peft
    if row == "qalora":
        return merge_qalora(peft)
    if row == "fp":
        return merge_bf16(peft, torch.float32)
    calib = None
    if row in CALIBRATED_REQUANT:
        dm.setup()
        calib = dm.train_blocks[: min(calib_blocks or cfg.ptq.n_samples, len(dm.train_blocks))].long()
    damp = cfg.lora.requant_damp if damp is None else damp
    return merge_requant(peft, row, calib, replace(cfg.ptq.gptq, damp=damp))[0]


def score(row: str, run: Path, blocks: int, per_task: int, calib_blocks: Optional[int] = None,
          damp: Optional[float] = None) -> dict:
    cfg = load_config(run / "config.yaml")
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    t = cfg.train
    dm = BlockData(path=cfg.data.path, text_field=cfg.data.text_field, seq_len=cfg.data.seq_len,
                   chat_template=cfg.data.chat_template, micro_batch_size=t.micro_batch_size, seed=cfg.seed,
                   tokenizer=tokenizer, val_fraction=cfg.data.val_fraction,
                   total_samples=t.max_steps * t.grad_accum * t.micro_batch_size, format=cfg.data.format,
                   packing=cfg.data.packing)
    t0 = time.perf_counter()
    model = _model(row, run, cfg, dm, calib_blocks, damp)
    merge_s = time.perf_counter() - t0
    model.eval()
    test = held_out(cfg, dm, tokenizer)
    n = max(1, min(blocks, HELD_OUT_BLOCKS) // test.batch_size)
    limited = [b for _, b in zip(range(n), test)]
    questions = held_out_questions(per_task, cfg.data.path)
    with model.disable_adapter() if row == "base" else contextlib.nullcontext():
        loss = held_out_loss(model, _Batches(limited, test.batch_size))
        inst = evaluate_instructions(model, tokenizer, questions)
    return {"row": row, "held_out_loss": loss, "blocks": n * test.batch_size, "merge_seconds": merge_s,
            "exact_match": inst["exact_match"], "by_task": inst["by_task"], "questions": inst["n"],
            "answers": inst["answers"][:6]}


class _Batches(list):
    """The first batches of the held-out loader, as `held_out_loss` reads a loader."""

    def __init__(self, batches: list, batch_size: int) -> None:
        super().__init__(batches)
        self.batch_size = batch_size


def table(results: list[dict]) -> str:
    by = {r["row"]: r for r in results}
    base, trained = by.get("base"), by.get("qlora")
    lines = ["| row | held-out loss | kept | exact match (title / section) |", "|---|---|---|---|"]
    for r in sorted(results, key=lambda r: ROWS.index(r["row"])):
        kept = ""
        if base and trained and base["held_out_loss"] > trained["held_out_loss"]:
            gain = base["held_out_loss"] - trained["held_out_loss"]
            kept = f"{100 * (base['held_out_loss'] - r['held_out_loss']) / gain:.0f}%"
        tasks = " / ".join(f"{100 * r['by_task'].get(k, 0):.0f}%" for k in ("title", "section"))
        lines.append(f"| {r['row']} | {r['held_out_loss']:.4f} | {kept} | {100 * r['exact_match']:.1f}% ({tasks}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path)
    ap.add_argument("--rows", default="base,qlora,rtn,gptq,gptq-grid,gptq-keep,fp")
    ap.add_argument("--blocks", type=int, default=16, help="held-out blocks scored (the run's own loss: 64)")
    ap.add_argument("--per-task", type=int, default=20, help="questions per task (title, section)")
    ap.add_argument("--calib-blocks", type=int, help="calibration blocks of the calibrated merges (default: the "
                    "run's ptq.n_samples, as its own merge)")
    ap.add_argument("--damp", type=float, help="GPTQ's damping in the GPTQ merges (default: the run's "
                    "lora.requant_damp)")
    ap.add_argument("--json", type=Path, help="write the rows' results here")
    ap.add_argument("--table", nargs="+", type=Path, help="print the table of these --json files and stop")
    a = ap.parse_args(argv)
    if a.table:
        print(table([r for p in a.table for r in json.loads(p.read_text())]))
        return 0
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    if bad or a.run is None or not (a.run / "adapters").is_dir():
        print(f"bench.qlora_merges: give --run <a finished QLoRA run folder> and --rows from {', '.join(ROWS)}"
              + (f" (not {bad[0]})" if bad else ""), file=sys.stderr)
        return 2
    out = []
    for row in rows:
        out.append(score(row, a.run, a.blocks, a.per_task, a.calib_blocks, a.damp))
        print(json.dumps({k: v for k, v in out[-1].items() if k != "answers"}), file=sys.stderr, flush=True)
        if a.json:
            a.json.write_text(json.dumps(out, indent=1))
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

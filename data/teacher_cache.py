"""Cached teacher logits: the teacher's top-k logits at every position of every packed block.

With `train.teacher_topk=k`, the teacher runs once over the packed data before training and its k
largest logits (bf16) and their token ids (int32) are stored next to the packed blocks; training then
distils from them (`trainer.losses.kd_loss_topk`) with no teacher in memory and no teacher forward
per step. k = vocabulary size reproduces the full KL exactly; smaller k drops the tail mass.

The file is keyed by the packed-block file (which is keyed by data, tokenizer and packing), the
teacher folder's weights and config, and k, so a change to any of them computes it again.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qat.io.atomic import atomic_file
from qat.io.progress import ProgressLines, bars_wanted

from .packing import model_inputs

TOPK_VERSION = 1


def teacher_signature(name_or_path: str) -> str:
    """The teacher's identity: its config and weight files (size, mtime) when it is a local folder."""
    p = Path(name_or_path).expanduser()
    sig: list = [name_or_path]
    if p.is_dir():
        for f in sorted(p.glob("*")):
            if f.suffix in (".safetensors", ".json", ".bin", ".gguf") and f.is_file():
                st = f.stat()
                sig.append((f.name, st.st_size, st.st_mtime_ns))
    return json.dumps(sig)


def topk_cache_file(block_file: Path, teacher: str, k: int) -> Path:
    key = json.dumps([TOPK_VERSION, block_file.name, teacher_signature(teacher), k])
    return block_file.with_name(f"topk-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors")


@torch.no_grad()
def compute_topk(
    teacher: nn.Module, blocks: torch.Tensor, k: int, batch_size: int = 4, progress: bool = True,
    positions: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (N, L, k) bf16, indices (N, L, k) int32) of the teacher's logits over each block; with `positions`
    (blocks packed with example boundaries) the teacher attends within each example, as in training."""
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if not 1 <= k <= vocab:
        raise ValueError(f"train.teacher_topk={k}: must be between 1 and the vocabulary size {vocab}")
    device = next(teacher.parameters()).device
    n, length = blocks.shape
    values = torch.empty(n, length, k, dtype=torch.bfloat16)
    indices = torch.empty(n, length, k, dtype=torch.int32)
    t0, done = time.perf_counter(), 0
    bar = progress and bars_wanted()
    # A log (stderr not a terminal) gets whole lines every 30 s instead of carriage-return updates.
    lines = ProgressLines(f"teacher top-{k}", n, 30.0, unit="blocks") if progress and not bar else None
    for i in range(0, n, batch_size):
        ids = blocks[i:i + batch_size].to(device=device, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if positions is not None:
            batch["position_ids"] = positions[i:i + batch_size].to(device=device, dtype=torch.long)
        logits = teacher(**model_inputs(batch)).logits.float()
        top = logits.topk(k, dim=-1)
        values[i:i + len(ids)] = top.values.to(torch.bfloat16).cpu()
        indices[i:i + len(ids)] = top.indices.to(torch.int32).cpu()
        done += ids.numel()
        if lines is not None:
            lines.update(min(i + batch_size, n), ids.numel())
        elif bar:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            eta = (n * length - done) / max(rate, 1e-9)
            print(f"\rteacher top-{k}: {min(i + batch_size, n)}/{n} blocks, {rate:.0f} tokens/s, ETA {eta:.0f} s",
                  end="", file=sys.stderr)
    if bar:
        print(file=sys.stderr)
    return values, indices


def build_topk_cache(
    path: Path, blocks: torch.Tensor, k: int, load_teacher: Callable[[], nn.Module], batch_size: int = 4,
    positions: Optional[torch.Tensor] = None,
) -> Path:
    """Compute and store the cache at `path` unless it is there (written whole, then renamed)."""
    if path.exists():
        return path
    teacher = load_teacher()
    values, indices = compute_topk(teacher, blocks, k, batch_size, positions=positions)
    del teacher
    with atomic_file(path) as tmp:
        save_file({"values": values, "indices": indices}, str(tmp), metadata={"k": str(k)})
    return path


def load_topk_cache(path: Path, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(str(path))
    values, indices = t["values"], t["indices"]
    if tuple(values.shape[:2]) != tuple(blocks.shape) or values.shape != indices.shape:
        raise ValueError(f"{path} holds top-k logits of shape {tuple(values.shape)} for blocks "
                         f"{tuple(blocks.shape)}; delete it to compute it again")
    return values, indices

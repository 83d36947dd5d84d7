"""Tokenizing documents and packing them into fixed-length training blocks: `pack` concatenates documents and cuts
the stream (text), `pack_bins` places whole examples into padded blocks with per-example positions (instructions),
and `model_inputs` hands either kind of batch to a model."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Optional

import numpy as np
import torch


def tokenize_texts(texts: Sequence[str], tokenizer, batch_size: int = 1024) -> list[list[int]]:
    """Token ids of each text, without special tokens (pack adds the EOS separators).

    Batched so a fast tokenizer encodes many texts per call in Rust.
    """
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        # verbose=False: documents longer than the model's context are expected here, packing cuts them.
        out += tokenizer(list(texts[i : i + batch_size]), add_special_tokens=False, verbose=False)["input_ids"]
    return out


def pack(docs: Iterable[Sequence[int]], block_len: int, eos_id: int) -> tuple[torch.Tensor, int]:
    """Concatenate the documents, each ending with one EOS, and cut the stream into full blocks.

    A document that already ends with EOS (a self-generated sample that stopped there) gets no second
    one; empty documents are skipped. The final partial block is dropped rather than padded, so every
    block is all real tokens: returns the (n_blocks, block_len) int64 blocks and how many tokens were
    dropped (< block_len). Every other token lands in exactly one block, in order.
    """
    if block_len < 2:
        raise ValueError(f"block length {block_len} is too short; use data.seq_len >= 2")
    eos = np.array([eos_id], dtype=np.int64)
    parts: list[np.ndarray] = []
    for d in docs:
        if len(d) == 0:
            continue
        a = np.asarray(d, dtype=np.int64)
        parts.append(a)
        if a[-1] != eos_id:
            parts.append(eos)
    stream = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    n = len(stream) // block_len
    blocks = torch.from_numpy(stream[: n * block_len].reshape(n, block_len))
    return blocks, len(stream) - n * block_len


# -- packing that keeps example boundaries --------------------------------------------------------------------

Piece = tuple[int, np.ndarray, np.ndarray]  # (example index, token ids, assistant bits) of at most one block


def _pieces(examples: Iterable[tuple[Sequence[int], Sequence[int]]], block_len: int,
            need_answer: bool) -> tuple[list[Piece], dict[str, int]]:
    """Each non-empty example whole, or cut into consecutive block-long pieces when longer than a block."""
    pieces: list[Piece] = []
    stats = {"split_examples": 0, "dropped_tokens": 0}
    for i, (ids, mask) in enumerate(examples):
        if len(ids) != len(mask):
            raise ValueError(f"an example has {len(ids)} tokens but {len(mask)} mask bits")
        a, m = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
        stats["split_examples"] += len(a) > block_len
        for lo in range(0, len(a), block_len):
            piece = (i, a[lo:lo + block_len], m[lo:lo + block_len].copy())
            # Nothing in its piece predicts a piece's first token, and the token before it belongs to another
            # example: it is never a target (a cut answer's continuation loses one target token).
            piece[2][0] = False
            if need_answer and not piece[2].any():  # a prompt-only piece of a cut example teaches nothing
                stats["dropped_tokens"] += len(piece[1])
                continue
            pieces.append(piece)
    return pieces, stats


def pack_bins(
    examples: Iterable[tuple[Sequence[int], Sequence[int]]], block_len: int, pad_id: int, need_answer: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Pack whole examples into blocks of `block_len` by best-fit decreasing, the tail of each block padded.

    An example is split only when it is longer than one block: it is cut into block-long pieces, each placed like
    an example of its own. Every piece's positions restart at 0 (for RoPE models restarting and continuing give
    the same logits, restarting keeps positions below `block_len`, and flash attention's varlen path starts a
    sequence at each 0), so a model given the positions and no 2-D attention mask attends within each piece
    only. The padded tail gets positions 0, 1, ... of its own, so no real token attends to it. The first token of
    every piece has assistant bit 0, so no loss reads a prediction across a boundary. With `need_answer`, a piece
    with no assistant bit set (the prompt part of a cut example) is dropped.

    Returns tensors (n, block_len): "blocks" int64, "assistant" bool, "attention" bool (False on padding),
    "positions" int32; and counts: split_examples, dropped_tokens, padding_tokens.
    """
    if block_len < 2:
        raise ValueError(f"block length {block_len} is too short; use data.seq_len >= 2")
    pieces, stats = _pieces(examples, block_len, need_answer)
    # Best-fit decreasing: longest first (ties in data order), each into the fullest block it still fits in.
    order = sorted(range(len(pieces)), key=lambda k: -len(pieces[k][1]))
    free: list[tuple[int, int]] = []  # (room left, block) of the blocks not yet full, sorted
    bins: list[list[int]] = []
    for k in order:
        n = len(pieces[k][1])
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            bins.append([k])
            room, b = block_len - n, len(bins) - 1
        else:
            room, b = free.pop(j)
            bins[b].append(k)
            room -= n
        if room:
            bisect.insort(free, (room, b))
    blocks = np.full((len(bins), block_len), pad_id, dtype=np.int64)
    assistant = np.zeros((len(bins), block_len), dtype=bool)
    attention = np.zeros((len(bins), block_len), dtype=bool)
    positions = np.zeros((len(bins), block_len), dtype=np.int32)
    ramp = np.arange(block_len, dtype=np.int32)
    for row, members in enumerate(bins):
        at = 0
        for k in sorted(members):  # data order inside a block
            _, ids, mask = pieces[k]
            blocks[row, at:at + len(ids)], assistant[row, at:at + len(ids)] = ids, mask
            attention[row, at:at + len(ids)] = True
            positions[row, at:at + len(ids)] = ramp[:len(ids)]
            at += len(ids)
        positions[row, at:] = ramp[:block_len - at]
    stats["padding_tokens"] = int((~attention).sum())
    tensors = {"blocks": blocks, "assistant": assistant, "attention": attention, "positions": positions}
    return {k: torch.from_numpy(v) for k, v in tensors.items()}, stats


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Optional[torch.Tensor]]:
    """The keyword arguments of a causal LM's forward for a batch of blocks.

    Blocks packed with their boundaries (`position_ids` in the batch) go in with their positions and no 2-D
    attention mask: transformers (5.x, masking_utils' packed-sequence detection, for sdpa, eager and flex; it
    needs no cache, hence use_cache=False) then builds a causal mask that is block-diagonal over the pieces.
    The batch's `attention_mask` (0 on the padded tail) still marks the real tokens for the losses.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None,
                "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}

"""Tokenizing documents and packing them into fixed-length training blocks."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def tokenize_texts(texts: list[str], tokenizer, batch_size: int = 256) -> list[list[int]]:
    """Token ids of each text, without special tokens (pack adds the EOS separators)."""
    out: list[list[int]] = []
    for i in range(0, len(texts), batch_size):
        out += tokenizer(texts[i : i + batch_size], add_special_tokens=False)["input_ids"]
    return out


def pack(docs: Iterable[list[int]], block_len: int, eos_id: int) -> tuple[torch.Tensor, int]:
    """Concatenate docs, each followed by EOS, and cut into (n_blocks, block_len) blocks.

    Returns the blocks and how many tokens of the final partial block were dropped: every other token
    lands in exactly one block, in order.
    """
    if block_len < 2:
        raise ValueError(f"block length {block_len} is too short; use data.seq_len >= 2")
    stream: list[int] = []
    for d in docs:
        stream += d
        stream.append(eos_id)
    n = len(stream) // block_len
    blocks = torch.tensor(stream[: n * block_len], dtype=torch.long).view(n, block_len)
    return blocks, len(stream) - n * block_len

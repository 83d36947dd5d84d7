"""Tokenizing documents and packing them into fixed-length training blocks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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

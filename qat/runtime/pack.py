"""Dense bit packing of integer codes into int32 words, in the compressed-tensors layout.

Element i of a row occupies bits [i*b, (i+1)*b) of the row's little-endian bit stream of int32 words
(so 4-bit codes sit two per byte, low nibble first), and codes are stored unsigned: a signed code q
of b bits is stored as q + 2**(b-1). This is the layout of compressed-tensors' "pack-quantized"
format, which vLLM and transformers read; the tests check it against that package bit for bit.
"""

from __future__ import annotations

import math
import sys

import torch

__all__ = ["pack_int32", "unpack_int32", "packed_cols"]


def packed_cols(cols: int, bits: int) -> int:
    return math.ceil(cols * bits / 32)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) unsigned codes in [0, 2**bits) -> (rows, ceil(cols*bits/32)) int32, packed along cols."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_int32: bits={bits}; codes of 1..8 bits pack into int32 words")
    if codes.dim() != 2:
        raise ValueError(f"pack_int32: expected a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"pack_int32: codes outside [0, {1 << bits}) do not fit {bits} bits")
    rows, cols = c.shape
    pad = (-cols) % 32
    c = torch.nn.functional.pad(c, (0, pad)).reshape(rows, -1, 32)  # 32 codes fill exactly `bits` words
    start = torch.arange(32, device=c.device) * bits
    word, off = start // 32, start % 32
    out = torch.zeros(rows, c.shape[1], bits, dtype=torch.int64, device=c.device)
    out.index_add_(2, word, (c << off) & 0xFFFFFFFF)
    spill = off + bits > 32  # a code split across two words (3, 5, 6, 7 bits)
    if bool(spill.any()):
        out.index_add_(2, word[spill] + 1, c[..., spill] >> (32 - off[spill]))
    out = out.reshape(rows, -1)[:, : packed_cols(cols, bits)]
    # The words are built as unsigned 32-bit values; store their two's-complement int32 bit pattern.
    return torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_int32: (rows, words) int32 -> (rows, cols) unsigned codes as uint8."""
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_int32: expected int32 words, got {packed.dtype}")
    rows, words = packed.shape
    if words != packed_cols(cols, bits):
        raise ValueError(f"unpack_int32: {words} words cannot hold {cols} codes of {bits} bits "
                         f"(expected {packed_cols(cols, bits)})")
    if bits in (1, 2, 4, 8) and sys.byteorder == "little":
        # Codes that never straddle a byte: on a little-endian host the words' bytes are the bit stream in
        # order, so shifting bytes unpacks them with no int64 temporaries (the QLoRA base does this per matmul).
        b = packed.contiguous().view(torch.uint8)
        per, mask = 8 // bits, (1 << bits) - 1
        codes = torch.stack([(b >> (bits * j)) & mask for j in range(per)], dim=-1) if per > 1 else b.clone()
        return codes.reshape(rows, -1)[:, :cols]
    w = packed.to(torch.int64) & 0xFFFFFFFF
    n = math.ceil(cols / 32) * 32
    w = torch.nn.functional.pad(w, (0, n // 32 * bits - words)).reshape(rows, -1, bits)
    start = torch.arange(32, device=w.device) * bits
    word, off = start // 32, start % 32
    lo = w[..., word] >> off
    spill = off + bits > 32
    hi = torch.zeros_like(lo)
    if bool(spill.any()):
        hi[..., spill] = w[..., word[spill] + 1] << (32 - off[spill])
    out = (lo | hi) & ((1 << bits) - 1)
    return out.reshape(rows, -1)[:, :cols].to(torch.uint8)

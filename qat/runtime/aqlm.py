"""The AQLM layer at run time: codes + codebooks + scales in the layout of transformers' AQLM integration (the `aqlm`
package), and a reference runtime that needs no `aqlm`: dequantize them to a weight, then F.linear.

Parameters of one layer, as `aqlm.QuantizedLinear` (out_group_size 1):
  codes      (out, in // g, M)  int8 for B <= 8, int16 for B <= 16; a code c >= 2^(B-1) stored as c - 2^B
  codebooks  (M, 2^B, 1, g)     the dtype of the model
  scales     (out, 1, 1, 1)
  bias       (out,) when the linear has one
The method that finds the codes is `qat.ptq.aqlm`; the folder it writes and its loader are `qat.ptq.aqlm_folder`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AQLMLinear", "bits_per_weight", "code_dtype", "dequantize", "pack_codes", "unpack_codes"]


def code_dtype(nbits: int) -> torch.dtype:
    if nbits <= 8:
        return torch.int8
    if nbits <= 16:
        return torch.int16
    raise ValueError(f"aqlm: {nbits}-bit codebooks do not fit int16 codes")


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codes in [0, 2^B) as aqlm stores them: signed, c >= 2^(B-1) wrapped to c - 2^B."""
    c = codes.to(torch.int64)
    return torch.where(c >= 1 << (nbits - 1), c - (1 << nbits), c).to(code_dtype(nbits))


def unpack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    return codes.to(torch.int64) % (1 << nbits)


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The weight (out, in) of stored codes (out, G, M), codebooks (M, K, 1, g) and scales (out, 1, 1, 1)."""
    m_books, k, _, g = codebooks.shape
    c = unpack_codes(codes, k.bit_length() - 1)
    v = sum(codebooks[m, :, 0, :][c[..., m]] for m in range(m_books))  # (out, G, g)
    return (v * scales.reshape(-1, 1, 1)).reshape(codes.shape[0], -1)


class AQLMLinear(nn.Module):
    """A linear whose weight is AQLM-coded; forward dequantizes it (the reference runtime) and runs F.linear."""

    def __init__(self, in_features: int, out_features: int, num_codebooks: int, nbits_per_codebook: int,
                 in_group_size: int = 8, bias: bool = False, dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        if in_features % in_group_size:
            raise ValueError(f"aqlm: in_features={in_features} is not a multiple of in_group_size={in_group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.num_codebooks, self.nbits_per_codebook = num_codebooks, nbits_per_codebook
        self.in_group_size = in_group_size
        kw = {"dtype": dtype, "device": device}
        self.codebooks = nn.Parameter(torch.zeros(num_codebooks, 1 << nbits_per_codebook, 1, in_group_size, **kw),
                                      requires_grad=False)
        self.codes = nn.Parameter(torch.zeros(out_features, in_features // in_group_size, num_codebooks,
                                              dtype=code_dtype(nbits_per_codebook), device=device), requires_grad=False)
        self.scales = nn.Parameter(torch.ones(out_features, 1, 1, 1, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor,
                   bias: Optional[torch.Tensor], dtype: torch.dtype, nbits: int) -> AQLMLinear:
        """From codes (out, G, M) in [0, 2^B), codebooks (M, 2^B, g), scales (out,)."""
        out, groups, m_books = codes.shape
        g = codebooks.shape[-1]
        m = cls(groups * g, out, m_books, nbits, g, bias is not None, dtype, codes.device)
        m.codes.data = pack_codes(codes, nbits)
        m.codebooks.data = codebooks.reshape(m.codebooks.shape).to(dtype).clone()
        m.scales.data = scales.reshape(-1, 1, 1, 1).to(dtype).clone()
        if bias is not None:
            m.bias.data = bias.detach().to(dtype).clone()
        return m

    def weight(self) -> torch.Tensor:
        return dequantize(self.codes, self.codebooks, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, aqlm "
                f"{self.num_codebooks}x{self.nbits_per_codebook} g{self.in_group_size}")


def bits_per_weight(m: AQLMLinear) -> float:
    """(code bits + codebook bits + scale bits) / weights, each counted as stored (bias not counted: not a weight)."""
    bits = m.codes.numel() * m.nbits_per_codebook
    bits += m.codebooks.numel() * m.codebooks.element_size() * 8 + m.scales.numel() * m.scales.element_size() * 8
    return bits / (m.in_features * m.out_features)

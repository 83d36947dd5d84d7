"""The exact torch reference of the integer runtime: integer codes, dequantization, per-token int8
activations and the W*A8 group sums with their fp32 epilogue (layouts as in `qat.runtime.ops`).

`qat.runtime.ops` runs these on CPU tensors and tests hold the kernels to them; `qat.runtime.tinygemm`
self-checks its packing against `dequantize_reference`. This module imports neither, so both can
import it.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quantizers import range_qparams
from ..spec import TensorSpec
from .pack import unpack_int32

__all__ = [
    "signed_codes", "signed_zero", "dequantize_reference", "quantize_act_reference", "group_accumulate_reference",
    "a8_epilogue_reference",
]


def signed_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """(N, K) int32 codes centred like the symmetric grid (u - 2**(bits-1)); int8 weights are already so."""
    if bits == 8:
        return qweight.to(torch.int32)
    return unpack_int32(qweight, bits, in_features).to(torch.int32) - (1 << (bits - 1))


def signed_zero(zero: Optional[torch.Tensor], bits: int) -> Optional[torch.Tensor]:
    """(N, G) int32 zero points in the domain of `signed_codes`; None means 0 (symmetric)."""
    if zero is None:
        return None
    z = zero.to(torch.int32)
    return z if bits == 8 else z - (1 << (bits - 1))


def _centred(qweight, zero, bits, group_size, in_features) -> torch.Tensor:
    """(N, G, g) int32: code - zero, the exact integer each weight is a multiple of its scale by."""
    q = signed_codes(qweight, bits, in_features)
    q = q.reshape(q.shape[0], -1, group_size)
    z = signed_zero(zero, bits)
    return q if z is None else q - z.unsqueeze(-1)


def dequantize_reference(
    qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int, group_size: int,
    in_features: int, dtype: torch.dtype,
) -> torch.Tensor:
    """(N, K) weight in `dtype`, the fake-quant weight bit for bit; the caller checked the layout."""
    c = _centred(qweight, zero, bits, group_size, in_features)
    w = c.float() * scale.float().unsqueeze(-1)  # exact integer times the stored scale, in fp32 as fake quant
    return w.reshape(c.shape[0], in_features).to(dtype)


def _act_spec(symmetric: bool) -> TensorSpec:
    return TensorSpec(bits=8, symmetric=bool(symmetric), granularity="token")


def quantize_act_reference(
    x2d: torch.Tensor, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`qat.runtime.ops.quantize_act_int8` in torch ops: (xq int8, xscale fp32 (M, 1), xzero int32 (M, 1) or None)."""
    spec = _act_spec(symmetric)
    r = x2d.float()
    scale, zero = range_qparams(r.amin(-1, keepdim=True), r.amax(-1, keepdim=True), spec)
    # As fake_quant_values: clamp before rounding; with integer bounds that is clamp(round(x / s)).
    y = r / scale
    if zero is None:
        q = y.clamp(spec.qmin, spec.qmax).round()
        return q.to(torch.int8), scale, None
    c = torch.clamp(y, spec.qmin - zero, spec.qmax - zero).round() + zero  # unsigned code in [0, 255]
    return (c - 128).to(torch.int8), scale, (zero - 128).to(torch.int32)


def group_accumulate_reference(
    xq: torch.Tensor, xzero: Optional[torch.Tensor], qweight: torch.Tensor, zero: Optional[torch.Tensor],
    bits: int, group_size: int, in_features: int,
) -> torch.Tensor:
    """(G, M, N) float64: per group, sum_k (xq - xzero)[m, k] * (code - zero)[n, k], exactly.

    Products are at most 255 * 255 and K is far below 2**53 / 65025, so every partial sum of a float64
    matmul is an exact integer whatever the summation order: an exact integer GEMM at BLAS speed.
    """
    xi = xq.double()
    if xzero is not None:
        xi = xi - xzero.double()
    c = _centred(qweight, zero, bits, group_size, in_features).double()  # (N, G, g)
    m, (n, ng, g) = xi.shape[0], c.shape
    out = torch.empty(ng, m, n, dtype=torch.float64, device=xi.device)
    for j in range(ng):
        torch.matmul(xi[:, j * g:(j + 1) * g], c[:, j].t(), out=out[j])
    return out


def a8_epilogue_reference(
    acc: torch.Tensor, xscale: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """y = xscale[m] * sum_g scale[n, g] * float32(acc_g) (+ bias), summed over groups in order, in fp32.

    float32(acc_g) is the rounding an int32 accumulator's conversion does, so kernels match this
    up to the order of their fp32 additions.
    """
    s = scale.float()
    y = torch.zeros(acc.shape[1:], dtype=torch.float32, device=acc.device)
    for j in range(acc.shape[0]):
        y = y + acc[j].float() * s[:, j]
    y = y * xscale
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)

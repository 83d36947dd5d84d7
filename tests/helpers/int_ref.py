"""What the integer runtime's tests share (tests/test_export_ops.py, the reference ops; test_export_kernels.py,
the Triton kernels): weights and activations with the outliers that stress a grid, a weight's codes laid out as
convert + load lay them out, and the exact int64 accumulation a W*A8 linear must reproduce."""

from __future__ import annotations

import torch

from qat.quantizers import WeightQuantizer
from qat.runtime.pack import pack_int32
from qat.spec import TensorSpec


def outlier_weight(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random weight with an outlier row, a zero row and an all-positive row (asymmetric grids)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, ::5] *= 40
    w[1] = 0
    w[2] = w[2].abs() + 0.01
    return w.to(dtype)


def outlier_acts(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """Activations with outlier columns, an all-zero token, an all-negative and a tiny-valued token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x2 = x.view(-1, shape[-1])
    x2[:, 3] *= 60
    if x2.shape[0] > 1:
        x2[1] = 0
    if x2.shape[0] > 2:
        x2[2] = -x2[2].abs() - 0.1
    if x2.shape[0] > 3:
        x2[3] *= 1e-5
    return x.to(dtype)


def weight_spec(bits: int, symmetric: bool, group: int | None, method: str = "minmax"):
    gran = "group" if group else "channel"
    return TensorSpec(bits=bits, symmetric=symmetric, granularity=gran, group_size=group, scale_method=method)


def convert_weight(w: torch.Tensor, spec):
    """(fake-quant weight, qweight, scale, zero, group_size, unsigned codes, unsigned zeros) as convert + load
    lay them out: packed unsigned codes (int8 signed ones for 8 bits), zeros in the matching domain."""
    wq = WeightQuantizer(spec, w)
    with torch.no_grad():
        fq = wq(w)
    codes, scale, zero = wq.quantize(w)
    bits, k = spec.bits, w.shape[1]
    u = (codes + (1 << (bits - 1)) if spec.symmetric else codes).to(torch.int64)
    zu = None if zero is None else zero.to(torch.int64)
    if bits == 8:
        qweight = (u - 128).to(torch.int8)
        z = None if zu is None else (zu - 128).to(torch.int8)
    else:
        qweight = pack_int32(u.to(torch.int32), bits)
        z = None if zu is None else zu.to(torch.uint8)
    return fq, qweight, scale.to(w.dtype), z, spec.group_size or k, u, zu


def int64_group_acc(xq, xz, u, zu, bits, group_size):
    """(G, M, N) int64: sum over each group of (xq - xz) * (u - z_u), from the codes, elementwise."""
    xi = xq.to(torch.int64) - (0 if xz is None else xz.to(torch.int64))
    n, k = u.shape
    z = torch.full((n, k // group_size), 1 << (bits - 1), dtype=torch.int64) if zu is None else zu
    wi = u - z.repeat_interleave(group_size, dim=1)
    prod = xi[:, None, :] * wi[None, :, :]  # (M, N, K)
    return prod.reshape(xi.shape[0], n, -1, group_size).sum(-1).permute(2, 0, 1)

"""Triton kernel: RMSNorm (Hugging Face's LlamaRMSNorm numerics) and per-token min/max fake quant of its
output in one read of the input and one write of the result.

Per row: var = mean(x^2) in fp32, rstd = 1 / sqrt(var + eps), n = (x * rstd) rounded to x's dtype,
y = weight * n rounded to the product's dtype (torch's type promotion), optionally cast to the dtype the
consumers compute in (autocast), then quantized exactly as `qat.kernels.fake_quant` does (the helpers are
shared). Only the sum of squares runs in another order than torch's, so y matches the reference to
rounding, and the quantized output is bit for bit the fake quant of this kernel's own y (`STORE_Y` writes
y too, for tests). rstd is written per row for the backward pass.

Import only after deciding on interpret mode (TRITON_INTERPRET=1 runs it on CPU tensors).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..device import launch_device, on_cuda
from .fake_quant import _DTYPE_CODES, MAX_N, _fake_quant_tile, _row_tile, int_grid, reciprocal, round_bf16, round_to
from .fake_quant import launch_config as _launch_config

__all__ = ["MAX_N", "rms_norm_quant_rows"]


@triton.jit
def _store(ptr, offs, v, mask, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """Store fp32 `v`, already rounded to DTYPE, into a DTYPE tensor (the interpreter's bf16 cast truncates)."""
    if EMULATE and DTYPE == 1:
        v = (round_bf16(v).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_quant_kernel(
    x_ptr, w_ptr, out_ptr, y_ptr, rstd_ptr, R, N, eps,
    q_range, inv_q_range,  # fp32: the scale divisor (TensorSpec.q_range) and its fp32 reciprocal
    QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr,
    IN_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, Q_DTYPE: tl.constexpr,
    RECIP: tl.constexpr, EMULATE: tl.constexpr, STORE_Y: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols, mask, offs = _row_tile(R, N, BLOCK_R, BLOCK_N)
    # Padding loads 0: it adds nothing to the sum of squares, and its y = 0 changes no min/max below.
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    ss = tl.sum(x * x, 1)
    var = tl.div_rn(ss, tl.zeros_like(ss) + N)  # torch's CPU mean: the sum, then one division
    rstd = tl.div_rn(tl.zeros_like(var) + 1.0, tl.sqrt_rn(var + eps))  # torch's CPU rsqrt: 1 / sqrt, both IEEE
    tl.store(rstd_ptr + rows, rstd, mask=rows < R)
    n = round_to(x * rstd[:, None], IN_DTYPE, EMULATE)  # hidden.to(input_dtype)
    y = round_to(w[None, :] * n, Y_DTYPE, EMULATE)  # weight * hidden: one rounding of an exact product
    if STORE_Y:
        _store(y_ptr, offs, y, mask, Y_DTYPE, EMULATE)
    y = round_to(y, Q_DTYPE, EMULATE)  # the consumers' x.to(autocast dtype)
    # qat.kernels.fake_quant's tile, with fp32 scales (activations).
    out = _fake_quant_tile(y, q_range, inv_q_range, QMIN, QMAX, SYMMETRIC, 0, RECIP, EMULATE, BLOCK_R, BLOCK_N,
                           False, 0.0)  # activations: never the signed grid
    _store(out_ptr, offs, round_to(out, Q_DTYPE, EMULATE), mask, Q_DTYPE, EMULATE)


# Whether triton.jit made the kernel an interpreted one (TRITON_INTERPRET=1 when this module was imported).
INTERPRETED = type(_rms_norm_quant_kernel).__name__ == "InterpretedFunction"


def rms_norm_quant_rows(
    x: torch.Tensor, weight: torch.Tensor, eps: float, bits: int, symmetric: bool,
    out_dtype: Optional[torch.dtype] = None, store_y: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(fake-quantized output in out_dtype, rstd (R,) fp32, y or None) for x of shape (R, N), 1 <= N <= MAX_N;
    the caller (qat.kernels.fused_rms_norm_quant) checks support."""
    x = x.detach().contiguous()
    w = weight.detach().contiguous()
    R, N = x.shape
    y_dtype = torch.promote_types(w.dtype, x.dtype)
    q_dtype = out_dtype or y_dtype
    out = torch.empty((R, N), dtype=q_dtype, device=x.device)
    y = torch.empty((R, N), dtype=y_dtype, device=x.device) if store_y else out
    rstd = torch.empty((R,), dtype=torch.float32, device=x.device)
    if R == 0:
        return out, rstd, (y if store_y else None)
    qmin, qmax, q_range = int_grid(bits, symmetric)
    block_r, block_n, warps = _launch_config(R, N)
    grid = (triton.cdiv(R, block_r),)
    args = (x, w, out, y, rstd, R, N, float(eps), float(q_range), reciprocal(q_range))
    meta = dict(
        QMIN=float(qmin), QMAX=float(qmax), SYMMETRIC=bool(symmetric),
        IN_DTYPE=_DTYPE_CODES[x.dtype], Y_DTYPE=_DTYPE_CODES[y_dtype], Q_DTYPE=_DTYPE_CODES[q_dtype],
        RECIP=on_cuda(x), EMULATE=INTERPRETED, STORE_Y=bool(store_y),
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps,
    )
    with launch_device(x):
        _rms_norm_quant_kernel[grid](*args, **meta)
    return out, rstd, (y if store_y else None)

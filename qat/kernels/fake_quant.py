"""Triton kernel: per-row min/max fake quantization (integer grid) in one read and one write.

Each program loads a [BLOCK_R, BLOCK_N] tile (BLOCK_R whole rows, BLOCK_N = next_power_of_2(n)),
reduces each row to its min/max scale, quantizes and dequantizes, and stores the result in the
input dtype. The arithmetic mirrors `qat.quantizers` step by step so the result is bit-identical
to `fake_quant(..., use_kernel=False)` on the same device:

- scale = absmax / (qmax + 1/2) (symmetric, the full signed range; absmax / qmax for `sym_range=qmax`),
  max(max(hi, 0) / qmax, min(lo, 0) / qmin) (`sym_range=signed`) or (hi - lo) / (qmax - qmin) (asymmetric). torch
  divides a
  tensor by a Python number as `x * (1 / b)` on CUDA but as a true division on CPU, so the kernel
  does the same (`RECIP`), then clamps at EPS and rounds the scale to the storage dtype.
- y = x / scale is an IEEE (round-to-nearest) division (`tl.div_rn`, not Triton's default
  approximate `div.full.f32`).
- round half to even via the 1.5 * 2^23 trick, then `(round(y) - y) + y` as `_round_ste` computes
  it (it gives +0.0 for codes of zero, and NaN for infinite y), clamps that propagate NaN as
  `torch.clamp` does.

In the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) fp32 -> bf16/fp16 casts do not round
to nearest even, so there (`EMULATE`) the kernel rounds with bit arithmetic first; on the GPU it uses
the hardware's round-to-nearest-even conversions. Import this module only after deciding on
interpret mode: `triton.jit` reads TRITON_INTERPRET when the kernel is defined.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..device import launch_device, on_cuda
from ..spec import TensorSpec

MAX_N = 32768  # longest row handled by one program; longer rows (per-tensor scales) use the reference
_DTYPE_CODES = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


# Rounding helpers that the norm-quant kernel and the runtime's Triton kernels (qat/runtime/triton_*.py) call
# too, so that every kernel rounds alike: public names, imported from here.
@triton.jit
def clamp(x, lo: tl.constexpr, hi: tl.constexpr):
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def rint(y):
    """torch.round (half to even) for finite y with |y| < 2^22 or |y| >= 2^23; NaN and inf pass through."""
    return tl.where(tl.abs(y) < 4194304.0, (y + 12582912.0) - 12582912.0, y)


@triton.jit
def round_bf16(v):
    """fp32 -> the nearest bf16 (ties to even), as fp32, by bit arithmetic."""
    b = v.to(tl.uint32, bitcast=True)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return tl.where(v != v, v, b.to(tl.float32, bitcast=True))


@triton.jit
def round_fp16(v):
    """fp32 -> the nearest fp16 (ties to even, subnormals, overflow to inf), as fp32, by fp32 arithmetic."""
    bits = v.to(tl.uint32, bitcast=True)
    a = tl.abs(v)
    e = ((bits >> 23) & 0xFF).to(tl.int32)
    e = tl.minimum(tl.maximum(e, 127 - 14), 127 + 15)  # fp16 subnormals share the ulp 2^-24
    # a + M rounds a to a multiple of the fp16 ulp 2^(e - 127 - 10) when M = 1.5 * 2^(e - 127 + 13).
    magic = (((e + 13) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (a + magic) - magic
    r = tl.where(a >= 65520.0, float("inf"), r)
    r = (r.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, r)


@triton.jit
def round_to(v, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """v (fp32) rounded to DTYPE (0: fp32, 1: bf16, 2: fp16) and back to fp32, ties to even."""
    if DTYPE == 1:
        if EMULATE:
            v = round_bf16(v)
        else:
            v = v.to(tl.bfloat16).to(tl.float32)
    elif DTYPE == 2:
        if EMULATE:
            v = round_fp16(v)
        else:
            v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _stored_scale(scale, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """The scale clamped at EPS and rounded to its storage dtype, as qat.quantizers.range_qparams does."""
    # 1e-8: qat.quantizers.EPS, the smallest scale.
    scale = round_to(tl.maximum(scale, 1e-8, propagate_nan=tl.PropagateNan.ALL), DTYPE, EMULATE)
    if DTYPE == 2:  # EPS underflows to 0 in fp16: keep the smallest fp16 subnormal instead
        scale = tl.maximum(scale, 5.960464477539063e-08, propagate_nan=tl.PropagateNan.ALL)
    return scale


@triton.jit
def _row_tile(R, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's BLOCK_R whole rows of an (R, N) row-major tensor: row and column indices, the in-bounds
    mask and the element offsets."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    return rows, cols, mask, rows[:, None].to(tl.int64) * N + cols[None, :]


@triton.jit
def _fake_quant_tile(
    x, q_range, inv_q_range,
    QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, SCALE_DTYPE: tl.constexpr,
    RECIP: tl.constexpr, EMULATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    SIGNED: tl.constexpr, INV_QMIN: tl.constexpr,
):
    """An fp32 [BLOCK_R, BLOCK_N] tile fake-quantized row by row with min/max scales (padding must hold 0),
    in fp32; what this module's kernel and qat.kernels.norm_quant's share. SIGNED (symmetric only): the signed
    grid's scale, q_range = qmax and INV_QMIN the fp32 1 / qmin."""
    # max |x| as the max of the bit patterns with the sign cleared: NaN (above +inf) propagates as in
    # torch.amax, where a float max would skip it (on GPU). A row with inf or NaN comes out all NaN.
    absmax = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 1).to(tl.float32, bitcast=True)
    if SYMMETRIC:
        if SIGNED:
            lo = tl.minimum(tl.min(x, 1), 0.0)
            hi = tl.maximum(tl.max(x, 1), 0.0)
            if RECIP:
                up, down = hi * inv_q_range, lo * INV_QMIN
            else:
                up, down = tl.div_rn(hi, tl.zeros_like(hi) + q_range), tl.div_rn(lo, tl.zeros_like(lo) + QMIN)
            scale = tl.maximum(up, down, propagate_nan=tl.PropagateNan.ALL)
            scale = tl.where(absmax == absmax, scale, absmax)  # a NaN row: NaN, as torch's amax gives
        elif RECIP:
            scale = absmax * inv_q_range
        else:
            scale = tl.div_rn(absmax, tl.zeros_like(absmax) + q_range)
        scale = _stored_scale(scale, SCALE_DTYPE, EMULATE)
        s = scale[:, None]
        y = tl.div_rn(x, tl.broadcast_to(s, (BLOCK_R, BLOCK_N)))
        q = (rint(y) - y) + y
        out = clamp(q, QMIN, QMAX) * s
    else:
        lo = tl.minimum(tl.min(x, 1), 0.0)
        hi = tl.maximum(tl.max(x, 1), 0.0)
        # Non-finite rows: torch's lo/hi carry the NaN or inf and every output is NaN; do the same.
        hi = tl.where(absmax == absmax, hi, absmax)
        if RECIP:
            scale = (hi - lo) * inv_q_range
        else:
            scale = tl.div_rn(hi - lo, tl.zeros_like(hi) + q_range)
        scale = _stored_scale(scale, SCALE_DTYPE, EMULATE)
        zero = clamp(rint(tl.div_rn(-lo, scale)), QMIN, QMAX)[:, None]
        s = scale[:, None]
        y = tl.div_rn(x, tl.broadcast_to(s, (BLOCK_R, BLOCK_N)))
        q = (rint(y) - y) + y
        out = (clamp(q + zero, QMIN, QMAX) - zero) * s
    return out


@triton.jit
def _fake_quant_rows_kernel(
    x_ptr, out_ptr, R, N,
    q_range, inv_q_range,  # fp32: the scale divisor (TensorSpec.q_range) and its fp32 reciprocal
    QMIN: tl.constexpr, QMAX: tl.constexpr,
    SYMMETRIC: tl.constexpr, SCALE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    RECIP: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SIGNED: tl.constexpr, INV_QMIN: tl.constexpr,
):
    rows, cols, mask, offs = _row_tile(R, N, BLOCK_R, BLOCK_N)
    # Padding loads 0, which changes neither max|x| nor min(min(x), 0) / max(max(x), 0).
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = _fake_quant_tile(x, q_range, inv_q_range, QMIN, QMAX, SYMMETRIC, SCALE_DTYPE, RECIP, EMULATE,
                           BLOCK_R, BLOCK_N, SIGNED, INV_QMIN)
    if EMULATE and OUT_DTYPE == 1:  # round to nearest even here, store the top half of the bits
        out = (round_bf16(out).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif EMULATE and OUT_DTYPE == 2:
        out = round_fp16(out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# Whether triton.jit made the kernel an interpreted one (TRITON_INTERPRET=1 when this module was imported).
INTERPRETED = type(_fake_quant_rows_kernel).__name__ == "InterpretedFunction"


@functools.cache
def reciprocal(q: float) -> float:
    """The fp32 1/q that torch's CUDA division of a tensor by the Python number q multiplies with."""
    return float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(float(q), dtype=torch.float32))


@functools.lru_cache(maxsize=4096)
def int_grid(bits: int, symmetric: bool, sym_range: str = "full") -> tuple[int, int, float]:
    """(qmin, qmax, the scale divisor): `TensorSpec.q_range` — qmax + 1/2 for symmetric grids over the full signed
    range, qmax for `qmax`, qmax - qmin for asymmetric ones; the signed grid divides its max by qmax (its min by
    qmin, which the kernel takes as a constant)."""
    spec = TensorSpec(bits=bits, symmetric=symmetric, sym_range=sym_range if symmetric else "full")
    return spec.qmin, spec.qmax, float(spec.qmax) if spec.sym_range == "signed" else spec.q_range


def launch_config(R: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps): whole rows per program, about 4-8K elements per program for short rows."""
    block_n = triton.next_power_of_2(n)
    block_r = max(1, min(triton.next_power_of_2(R), 4096 // block_n))
    elems = block_r * block_n
    if elems <= 1024:
        warps = 2
    elif elems <= 2048:
        warps = 4
    elif elems <= 8192:
        warps = 8
    else:
        warps = 16
    return block_r, block_n, warps


def fake_quant_rows(
    rows: torch.Tensor, bits: int, symmetric: bool, scale_dtype: Optional[torch.dtype], sym_range: str = "full",
) -> torch.Tensor:
    """Launch the kernel on a 2-D (R, n) tensor with 1 <= n <= MAX_N; the caller checks support."""
    x = rows.detach().contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    R, n = x.shape
    if R == 0:
        return out
    qmin, qmax, q_range = int_grid(bits, symmetric, sym_range)
    block_r, block_n, warps = launch_config(R, n)
    grid = (triton.cdiv(R, block_r),)
    args = dict(
        QMIN=float(qmin), QMAX=float(qmax), SYMMETRIC=bool(symmetric),
        SCALE_DTYPE=_DTYPE_CODES[scale_dtype], OUT_DTYPE=_DTYPE_CODES[x.dtype],
        RECIP=on_cuda(x), EMULATE=INTERPRETED,
        BLOCK_R=block_r, BLOCK_N=block_n, SIGNED=bool(symmetric and sym_range == "signed"),
        INV_QMIN=reciprocal(float(qmin)) if qmin else 0.0, num_warps=warps,
    )
    with launch_device(x):
        _fake_quant_rows_kernel[grid](x, out, R, n, float(q_range), reciprocal(q_range), **args)
    return out

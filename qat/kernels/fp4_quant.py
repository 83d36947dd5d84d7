"""Triton kernel: NVFP4 / MXFP4 fake quantization of (R, 16) / (R, 32) block rows in one read and one write.

The arithmetic mirrors `qat.fp4` and `qat.quantizers.fake_quant_values` step by step, so the output is
bit-identical to `fake_quant(rows, spec, use_kernel=False, global_rows=...)` on the same device:

- A block's max |x| is the max of its bit patterns with the sign cleared (NaN propagates, as torch.amax).
- MXFP4: frexp from the fp32 bit pattern (exponent field; a mantissa field >= 0x600000 is m >= 0.875, which
  rounds up), the e8m0 clamp, zero blocks at 2^-127, and glibc's frexp(inf) = (inf, 0) (an inf block gets
  2^-2, as the reference on CPU). y = x * 2^-e is the same correctly rounded real as x / 2^e and never divides
  by the subnormal 2^-127.
- NVFP4: s = G * amax / 6 (torch's CUDA tensor / scalar multiplies by the fp32 reciprocal, `RECIP`), clamped at
  448, rounded to e4m3 by the magic-number trick at e4m3's ulp (2^-9 below 2^-6: its subnormals), floored at
  2^-9; eff = s / G. G = 2^k per chunk of `global_rows` blocks. Where a chunk fits one program (activations: one
  token's C / 16 blocks; small weights) the program owns the chunk and finds k from the chunk's max (frexp by
  bits again), so the tensor is read once. Otherwise (a weight's one tensor scale) torch finds k first from
  one aminmax per chunk with `qat.fp4.nvfp4_global_exponent` itself: max and the division by 6 commute (both are
  monotone), so k is the reference's. That costs one more read of the weight (a reduction, cheap next to the
  matmul it feeds) and keeps the kernel free of a grid-wide reduction; it is exact on any device, which a
  rounded log2 or an atomic max over programs would make harder to hold.
- y = x / eff (IEEE division, `tl.div_rn`), clamped to +-6, e2m1 round half to even (y * 2, y or y / 2 by the
  1.5 * 2^23 trick), then (q - y) + y as the reference's STE computes it (+0.0 for zero codes), times eff,
  stored in the input dtype with round to nearest even (emulated in the interpreter, as in fake_quant.py).

Tested in the interpreter only so far (tests/test_fp4_kernel.py); on a GPU two things are unchecked: blocks with
inf or NaN (CUDA's frexp leaves their exponent unspecified, so the reference there may not be glibc's), and
subnormal scales (all-tiny tensors) if the compiled kernel flushed denormals.

The launcher also returns eff per block: the clamp-aware STE's backward (`qat.kernels.Fp4FakeQuant`) needs it.
Import this module only after deciding on interpret mode: `triton.jit` reads TRITON_INTERPRET when a kernel is
defined.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..device import launch_device, on_cuda
from ..fp4 import FP4_MAX, nvfp4_global_exponent
from .fake_quant import INTERPRETED, clamp, reciprocal, rint, round_bf16, round_fp16

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_CHUNK = 32768  # most elements one program holds: larger NVFP4 chunks take their k from torch
_TILE = 4096  # elements per program for row tiles (MXFP4, and NVFP4 with k from torch)


@triton.jit
def pow2(e):
    """2^e as fp32 for int32 e in [-127, 127] (2^-127 is subnormal: half of 2^-126)."""
    n = (tl.maximum(e, -126) + 127) << 23
    p = n.to(tl.float32, bitcast=True)
    return tl.where(e < -126, p * 0.5, p)


@triton.jit
def round_e4m3(s):
    """s in [0, 448] (or NaN) rounded to the nearest e4m3fn value, ties to even, as fp32."""
    e = ((s.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)
    e = tl.maximum(e, 127 - 6)  # e4m3 subnormals share the ulp 2^-9
    # s + M rounds s to a multiple of e4m3's ulp 2^(e - 127 - 3) when M = 1.5 * 2^(e - 127 + 20).
    magic = (((e + 20) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (s + magic) - magic
    return tl.where(s != s, s, r)


@triton.jit
def round_e2m1(y):
    """fp4_round for y already clamped to [-6, 6]: e2m1's steps 0.5 / 1 / 2 below 2 / 4 / 6, ties to even."""
    a = tl.abs(y)
    r = tl.where(a < 2.0, rint(a * 2.0) * 0.5, tl.where(a < 4.0, rint(a), rint(a * 0.5) * 2.0))
    sign = y.to(tl.uint32, bitcast=True) & 0x80000000
    return ((r.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) | sign).to(tl.float32, bitcast=True)


@triton.jit
def nvfp4_k(top):
    """qat.fp4.nvfp4_global_exponent of a chunk whose max block amax / 6 is `top` (>= 0, inf or NaN)."""
    bits = top.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    # frexp: top = m * 2^(biased - 126), m <= 0.875 iff the mantissa field <= 0x600000; k = 9 - e or 8 - e.
    # Subnormal tops give k >= 127 either way, which the clamp turns into 126 as the reference's.
    k = tl.where((bits & 0x7FFFFF) <= 0x600000, 135 - biased, 134 - biased)
    k = tl.minimum(tl.maximum(k, -126), 126)
    return tl.where((top > 0) & (top < float("inf")), k, 8)  # zero, NaN, inf: frexp gives e = 0 or top = 1


@triton.jit
def _fp4_rows_kernel(
    x_ptr, out_ptr, eff_ptr, k_ptr, R, CHUNK, inv_six,
    MX: tl.constexpr, CHUNK_PROGRAM: tl.constexpr, RECIP: tl.constexpr,
    OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    local = tl.arange(0, BLOCK_R)
    if CHUNK_PROGRAM:  # this program's rows are chunk pid, CHUNK blocks
        rows = tl.program_id(0) * CHUNK + local
        rmask = local < CHUNK
    else:
        rows = tl.program_id(0) * BLOCK_R + local
        rmask = rows < R
    cols = tl.arange(0, BLOCK_N)
    offs = rows[:, None].to(tl.int64) * BLOCK_N + cols[None, :]
    mask = rmask[:, None] & (cols[None, :] < BLOCK_N)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # padding rows are zero blocks
    amax_bits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 1)
    amax = amax_bits.to(tl.float32, bitcast=True)
    if MX:
        top = tl.where((amax_bits & 0x7FFFFF) >= 0x600000, (amax_bits >> 23) - 126, (amax_bits >> 23) - 127)
        top = tl.where(amax > 0, top, -125)
        top = tl.where(amax == float("inf"), 0, top)
        e = tl.minimum(tl.maximum(top - 2, -127), 127)
        eff = pow2(e)
        y = x * pow2(-e)[:, None]
    else:
        if RECIP:
            t = amax * inv_six
        else:
            t = tl.div_rn(amax, tl.zeros_like(amax) + 6.0)
        if CHUNK_PROGRAM:
            # NaN-propagating max (the reference's amax): t >= 0, so compare bit patterns, sign cleared.
            top = tl.max(t.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0).to(tl.float32, bitcast=True)
            k = nvfp4_k(top)
        else:
            k = tl.load(k_ptr + rows // CHUNK, mask=rmask, other=0)
        s = clamp(t * pow2(k), 0.0, 448.0)
        s = tl.maximum(round_e4m3(s), 0.001953125, propagate_nan=tl.PropagateNan.ALL)  # 2^-9: E4M3_TINY
        eff = s * pow2(-k)  # exact: the same real as s / G
        y = tl.div_rn(x, tl.broadcast_to(eff[:, None], (BLOCK_R, BLOCK_N)))
    y = clamp(y, -6.0, 6.0)
    out = ((round_e2m1(y) - y) + y) * eff[:, None]
    if EMULATE and OUT_DTYPE == 1:  # round to nearest even here, store the top half of the bits
        out = (round_bf16(out).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif EMULATE and OUT_DTYPE == 2:
        out = round_fp16(out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(eff_ptr + rows, eff, mask=rmask)


def _warps(elems: int) -> int:
    return 2 if elems <= 1024 else 4 if elems <= 2048 else 8 if elems <= 8192 else 16


def fp4_fake_quant_rows(
    rows: torch.Tensor, mx: bool, global_rows: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, eff) for (R, 32) MXFP4 or (R, 16) NVFP4 block rows; eff (R, 1) fp32. The caller checks support
    (the block width, dtypes, R a multiple of global_rows)."""
    x = rows.detach().contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    R, n = x.shape
    eff = torch.empty(R, 1, dtype=torch.float32, device=x.device)
    if R == 0:
        return out, eff
    chunk = R if global_rows is None else global_rows
    chunk_program = not mx and chunk * n <= MAX_CHUNK
    k = eff  # unused unless NVFP4 takes k from torch
    if chunk_program:
        block_r, grid = triton.next_power_of_2(chunk), (R // chunk,)
    else:
        block_r = max(1, min(triton.next_power_of_2(R), _TILE // n))
        grid = (triton.cdiv(R, block_r),)
        if not mx:
            lo, hi = x.reshape(R // chunk, chunk * n).aminmax(dim=-1)
            k = nvfp4_global_exponent(torch.maximum(lo.abs(), hi.abs()).float().reshape(-1, 1) / FP4_MAX, 1)
    with launch_device(x):
        _fp4_rows_kernel[grid](
            x, out, eff, k, R, chunk, reciprocal(6),
            MX=bool(mx), CHUNK_PROGRAM=chunk_program, RECIP=on_cuda(x), OUT_DTYPE=_DTYPE_CODES[x.dtype],
            EMULATE=INTERPRETED, BLOCK_R=block_r, BLOCK_N=n, num_warps=_warps(block_r * n),
        )
    return out, eff

"""Triton kernels of the integer runtime: dequantization, W4/W8 x A16 GEMM, W2/W4 x A16 GEMV, int8 activation
quant, W8/W4 x A8 GEMM.

Conventions shared by the kernels (the layout is described in `qat.export.ops`):
- Weight codes are read as signed codes q = u - 2**(bits-1) (int8 weights are stored so), zeros in the
  same domain, so (q - z) is the exact integer the trained weight is a multiple of its scale by.
- Packed words (bits 2 and 4: 32 // bits codes per int32 word) are unpacked in the GEMM main loop,
  so the weight crosses memory at its packed size. Each word is loaded once, as a tile of words, and
  split into its codes by shifts (`_load_codes_nk`); the small-M GEMV (`_gemv_kernel`) does the same
  on CUDA cores with split-K.
- A K tile never straddles a weight group (BLOCK_K divides group_size), so a group's scale and zero are
  one value per output column for the whole tile.
- Split-K for small M: programs along K add their fp32 partial outputs atomically into a zeroed fp32
  buffer, and bias and the cast to the activation dtype follow in torch. Partial sums then add in a
  nondeterministic order (fp32 rounding only; integer group sums are never split).
- In the interpreter (TRITON_INTERPRET=1, CPU tensors) fp32 -> bf16/fp16 casts truncate, so there
  (`EMULATE`) values are rounded to nearest even by bit arithmetic first (qat.kernels.fake_quant's
  helpers); dequantized weights are then bit-identical to the reference on CPU and GPU alike.

Import this module only after deciding on interpret mode: `triton.jit` reads TRITON_INTERPRET when
the kernels are defined.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..kernels.fake_quant import _clamp, _reciprocal, _rint, _round_bf16, _round_fp16, _round_to

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KERNEL_BITS = (2, 4, 8)  # widths the kernels unpack (a code never spans two words)
ACT_MAX_K = 32768  # longest activation row one program quantizes
MAX_GROUP_A8 = 32768  # 255 * 255 * 32768 < 2**31: a group's exact sum fits the int32 accumulator


@triton.jit
def _cast(v, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 v -> DTYPE (0 fp32, 1 bf16, 2 fp16), round to nearest even on every backend."""
    if DTYPE == 1:
        if EMULATE:
            return (_round_bf16(v).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(tl.bfloat16)
    elif DTYPE == 2:
        if EMULATE:
            return _round_fp16(v).to(tl.float16)
        else:
            return v.to(tl.float16)
    else:
        return v


@triton.jit
def _write_out(out_ptr, b_ptr, y, offs_m, offs_n, mmask, nmask, N, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
               OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """The epilogue of every GEMM here: store the fp32 tile with the bias added, cast to OUT_DTYPE; or,
    under split-K, add it atomically into an fp32 buffer (the launcher adds the bias and casts)."""
    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if not ATOMIC:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, _cast(y, OUT_DTYPE, EMULATE), mask=omask)
    else:
        tl.atomic_add(out_ptr + out_offs, y, mask=omask)


@triton.jit
def _load_codes_nk(w_ptr, k0, offs_n, N, K, stride_wn, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] int32 signed codes of columns k0 .. k0 + BLOCK_K of the weight (stored (N, K));
    rows beyond N and columns beyond K read 0. k0 and BLOCK_K are multiples of 32 // BITS: each packed
    int32 word is loaded once, in a [BLOCK_N, BLOCK_K // ELEMS] tile, and its codes are unpacked by
    shifts along a third axis that a reshape folds into K (code i of a word sits at bits i*BITS)."""
    nmask = offs_n < N
    rows = offs_n.to(tl.int64) * stride_wn
    if BITS == 8:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(w_ptr + rows[:, None] + offs_k[None, :], mask=nmask[:, None] & (offs_k < K)[None, :],
                    other=0).to(tl.int32)
    else:
        ELEMS: tl.constexpr = 32 // BITS
        BLOCK_W: tl.constexpr = BLOCK_K // ELEMS
        offs_w = k0 // ELEMS + tl.arange(0, BLOCK_W)
        wmask = nmask[:, None] & (offs_w < (K + ELEMS - 1) // ELEMS)[None, :]
        word = tl.load(w_ptr + rows[:, None] + offs_w[None, :], mask=wmask, other=0)  # [BN, BW] int32
        shifts = tl.arange(0, ELEMS) * BITS
        q3 = (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BN, BW, ELEMS]
        q = tl.reshape(q3, (BLOCK_N, BLOCK_K)) - (1 << (BITS - 1))
    return q


# ---------------------------------------------------------------------------------------------
# Dequantization: (N, K) codes -> (N, K) weight in the activation dtype.


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, G, group_size, stride_wn,
    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO_OFFSET: tl.constexpr, OUT_DTYPE: tl.constexpr,
    EMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    q = _load_codes_nk(w_ptr, k0, offs_n, N, K, stride_wn, BITS, BLOCK_N, BLOCK_K)  # [BN, BK]
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    gidx = offs_n[:, None].to(tl.int64) * G + (offs_k // group_size)[None, :]
    if HAS_ZERO:
        q = q - (tl.load(z_ptr + gidx, mask=mask, other=0).to(tl.int32) - ZERO_OFFSET)
    w = q.to(tl.float32) * tl.load(s_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
    out = _cast(w, OUT_DTYPE, EMULATE)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], out, mask=mask)


def dequant_supported(bits: int, dtype: torch.dtype) -> bool:
    return bits in KERNEL_BITS and dtype in _DTYPE_CODES


def _interpreted() -> bool:
    return type(_dequant_kernel).__name__ == "InterpretedFunction"


def _zero_args(zero: Optional[torch.Tensor], bits: int, like: torch.Tensor):
    """(pointer tensor, HAS_ZERO, ZERO_OFFSET): kernels subtract ZERO_OFFSET to reach the signed domain."""
    if zero is None:
        return like, False, 0
    return zero.contiguous(), True, (0 if bits == 8 else 1 << (bits - 1))


def dequantize(qweight, scale, zero, bits: int, group_size: int, in_features: int, dtype: torch.dtype):
    n, k = qweight.shape[0], in_features
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    if n == 0 or k == 0:
        return out
    w, s = qweight.contiguous(), scale.contiguous()
    z, has_zero, zoff = _zero_args(zero, bits, s)
    bn, bk = 32, 128
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _dequant_kernel[grid](
        w, s, z, out, n, k, s.shape[1], group_size, w.stride(0),
        BITS=bits, HAS_ZERO=has_zero, ZERO_OFFSET=zoff, OUT_DTYPE=_DTYPE_CODES[dtype], EMULATE=_interpreted(),
        BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------------
# W{2,4,8} x A16: tensor-core GEMM with the weight dequantized tile by tile in the main loop.


@triton.jit
def _a16_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, G, group_size, stride_xm, stride_wn, tiles_per_split,
    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr, X_DTYPE: tl.constexpr, IEEE: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    mmask = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, K // BLOCK_K)
    for t in range(t0, t1):
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=mmask[:, None],
                    other=0.0)
        q = tl.trans(_load_codes_nk(w_ptr, t * BLOCK_K, offs_n, N, K, stride_wn, BITS, BLOCK_N, BLOCK_K))
        gidx = offs_n.to(tl.int64) * G + (t * BLOCK_K) // group_size
        if HAS_ZERO:
            q = q - (tl.load(z_ptr + gidx, mask=nmask, other=0).to(tl.int32) - ZERO_OFFSET)[None, :]
        s = tl.load(s_ptr + gidx, mask=nmask, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s[None, :]
        if EMULATE:
            # The interpreter's dot misreads bit-cast bf16 tiles: dot in fp32 on values rounded to
            # X_DTYPE, which is what a 16-bit dot with fp32 accumulation computes.
            acc += tl.dot(x.to(tl.float32), _round_to(w, X_DTYPE, True), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))  # the exact fake-quant weight, rounded once to x.dtype
    _write_out(out_ptr, b_ptr, acc, offs_m, offs_n, mmask, nmask, N, HAS_BIAS, ATOMIC, X_DTYPE, EMULATE)


def _pow2_divisor(v: int, cap: int) -> int:
    """The largest power of two dividing v, at most cap."""
    return min(v & -v, cap)


def a16_supported(bits: int, group_size: int, dtype: torch.dtype) -> bool:
    return bits in KERNEL_BITS and dtype in _DTYPE_CODES and _pow2_divisor(group_size, 1 << 20) >= 16


@functools.lru_cache(maxsize=64)
def _num_sms(device_index: int) -> int:
    if device_index < 0:
        return 4  # the interpreter: a few programs are plenty
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(t: torch.Tensor) -> int:
    return (t.device.index if t.device.index is not None else torch.cuda.current_device()) if t.is_cuda else -1


def gemm_config(m: int, n: int, max_bk: int, a8: bool) -> dict:
    """Tile sizes and warps by M (untuned defaults; bench/kernels.py times them). Small M is bound by
    weight bytes: narrow M tiles, long K tiles; large M is compute bound: big tiles."""
    if m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m <= 32:
        bm, bn, bk, warps, stages = 32, 64, 128 if a8 else 64, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 128 if a8 else 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 128 if a8 else 64, 8, 3
    bn = min(bn, max(16, triton.next_power_of_2(n)))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, max_bk), num_warps=warps, num_stages=stages)


def split_k(m: int, n: int, cfg: dict, units: int, sms: int) -> tuple[int, int]:
    """(splits, units per split): enough programs along K to give every SM two when M is small."""
    if m > 64 or units <= 1:
        return 1, units
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = max(1, min(units, (2 * sms) // max(tiles, 1)))
    per = triton.cdiv(units, split)
    return triton.cdiv(units, per), per


def _split_out(m: int, n: int, cfg: dict, split: int, dtype: torch.dtype, device: torch.device):
    """(grid, out) of a GEMM launch: split-K programs add into fp32 zeros atomically (finished by
    `_finish_split`); a single pass writes the output once, in its dtype."""
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    if split > 1:
        return grid, torch.zeros(m, n, dtype=torch.float32, device=device)
    return grid, torch.empty(m, n, dtype=dtype, device=device)


def _finish_split(out32: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        out32 += bias.float()
    return out32.to(dtype)


def _a16_operands(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]):
    """x with unit column stride, contiguous codes and scales, the bias in x.dtype (F.linear adds it so)."""
    x = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    return x, qweight.contiguous(), scale.contiguous(), bias


def linear_a16(x2d, qweight, scale, zero, bits: int, group_size: int, bias: Optional[torch.Tensor]):
    """(M, K) x.dtype -> (M, N) x.dtype; the caller checked the layout and `a16_supported`."""
    m, k = x2d.shape
    n = qweight.shape[0]
    if m == 0:
        return x2d.new_empty(m, n)
    x, w, s, bias = _a16_operands(x2d, qweight, scale, bias)
    z, has_zero, zoff = _zero_args(zero, bits, s)
    cfg = gemm_config(m, n, _pow2_divisor(group_size, 128), a8=False)
    split, per = split_k(m, n, cfg, k // cfg["BLOCK_K"], _num_sms(_device_index(x)))
    grid, out = _split_out(m, n, cfg, split, x.dtype, x.device)
    b = bias if bias is not None else s
    _a16_kernel[grid](
        x, w, s, z, b, out, m, n, k, s.shape[1], group_size, x.stride(0), w.stride(0), per,
        BITS=bits, HAS_ZERO=has_zero, ZERO_OFFSET=zoff, HAS_BIAS=bias is not None, ATOMIC=split > 1,
        X_DTYPE=_DTYPE_CODES[x.dtype], IEEE=x.dtype == torch.float32, EMULATE=_interpreted(), **cfg,
    )
    return _finish_split(out, bias, x.dtype) if split > 1 else out


# ---------------------------------------------------------------------------------------------
# W{2,4} x A16 at small M (decode): a GEMV on CUDA cores, no tensor cores.
#
# Each program reads a [BLOCK_N, BLOCK_W] tile of packed int32 words once per step (every weight byte
# crosses memory once per BLOCK_M rows of x), unpacks its 32 // BITS codes with shifts, one strided
# sub-column of x at a time, and accumulates (code - zero) * x in fp32 over a [BLOCK_M, BLOCK_N, BLOCK_W]
# tile; a K tile lies inside one weight group, so its scale is one value per row, applied once per tile.
# Split-K over many programs (atomic fp32 adds) gives a weight-bound decode enough loads in flight.


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, G, group_size, stride_xm, stride_wn, tiles_per_split,
    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
    X_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    ELEMS: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_W * ELEMS
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    mmask, nmask = offs_m < M, offs_n < N
    wrows = offs_n.to(tl.int64) * stride_wn
    xrows = offs_m.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.float32)
    t0 = pid_k * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, K // BLOCK_K)
    for t in range(t0, t1):
        k0 = t * BLOCK_K
        word = tl.load(w_ptr + wrows[:, None] + (k0 // ELEMS + offs_w)[None, :], mask=nmask[:, None], other=0)
        gidx = offs_n.to(tl.int64) * G + k0 // group_size
        s = tl.load(s_ptr + gidx, mask=nmask, other=0.0).to(tl.float32)
        if HAS_ZERO:  # unsigned zeros: (u - z_u) is the exact integer
            zu = tl.load(z_ptr + gidx, mask=nmask, other=0).to(tl.float32)
        else:
            zu = tl.zeros((BLOCK_N,), dtype=tl.float32) + (1 << (BITS - 1))
        part = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.float32)
        for i in tl.static_range(ELEMS):
            xi = tl.load(x_ptr + xrows[:, None] + (k0 + offs_w * ELEMS + i)[None, :], mask=mmask[:, None],
                         other=0.0).to(tl.float32)  # [BM, BW]: the x of code i of each word
            c = ((word >> (i * BITS)) & ((1 << BITS) - 1)).to(tl.float32) - zu[:, None]  # [BN, BW], exact
            part += c[None, :, :] * xi[:, None, :]
        acc += part * s[None, :, None]
    y = tl.sum(acc, 2)
    _write_out(out_ptr, b_ptr, y, offs_m, offs_n, mmask, nmask, N, HAS_BIAS, ATOMIC, X_DTYPE, EMULATE)


GEMV_BITS = (2, 4)
GEMV_WORDS = 1024  # packed words per program and step (BLOCK_N * BLOCK_W): 4 KiB of weight


def gemv_supported(bits: int, group_size: int, dtype: torch.dtype) -> bool:
    """Packed widths whose groups hold at least two whole words (a K tile never straddles a group)."""
    return bits in GEMV_BITS and dtype in _DTYPE_CODES and _pow2_divisor(group_size, 1 << 20) >= 2 * (32 // bits)


def gemv_config(m: int, n: int, bits: int, group_size: int) -> dict:
    """BLOCK_M rows of x share each weight tile (up to 4); BLOCK_W words along K (at most a group's,
    up to 32); BLOCK_N rows so that a step reads GEMV_WORDS words. Untuned: bench/kernels.py times it."""
    bm = min(triton.next_power_of_2(max(m, 1)), 4)
    bw = min(32, _pow2_divisor(group_size, 1 << 20) // (32 // bits))
    bn = max(16, min(256, GEMV_WORDS // bw, triton.next_power_of_2(max(n, 1))))
    if bm > 1:
        bn = max(16, bn // 2)  # keep the [BM, BN, BW] fp32 accumulators in registers
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_W=bw, num_warps=4, num_stages=3)


def gemv_split(m: int, n: int, k_tiles: int, cfg: dict, sms: int) -> tuple[int, int]:
    """(splits, K tiles per split): at least 4 programs per SM when there are enough K tiles."""
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    split = max(1, min(k_tiles, triton.cdiv(4 * sms, tiles)))
    per = triton.cdiv(k_tiles, split)
    return triton.cdiv(k_tiles, per), per


def linear_gemv(x2d, qweight, scale, zero, bits: int, group_size: int, bias: Optional[torch.Tensor]):
    """(M, K) x.dtype -> (M, N) x.dtype for small M; the caller checked the layout and `gemv_supported`."""
    m, k = x2d.shape
    n = qweight.shape[0]
    if m == 0:
        return x2d.new_empty(m, n)
    x, w, s, bias = _a16_operands(x2d, qweight, scale, bias)
    z = zero.contiguous() if zero is not None else s
    cfg = gemv_config(m, n, bits, group_size)
    k_tiles = k // (cfg["BLOCK_W"] * (32 // bits))
    split, per = gemv_split(m, n, k_tiles, cfg, _num_sms(_device_index(x)))
    grid, out = _split_out(m, n, cfg, split, x.dtype, x.device)
    b = bias if bias is not None else s
    _gemv_kernel[grid](
        x, w, s, z, b, out, m, n, k, s.shape[1], group_size, x.stride(0), w.stride(0), per,
        BITS=bits, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, ATOMIC=split > 1,
        X_DTYPE=_DTYPE_CODES[x.dtype], EMULATE=_interpreted(), **cfg,
    )
    return _finish_split(out, bias, x.dtype) if split > 1 else out


# ---------------------------------------------------------------------------------------------
# Dynamic per-token int8 activation quantization (one pass: row min/max, scale, codes).


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, M, K, stride_xm, inv_q_range, q_range,
    SYMMETRIC: tl.constexpr, RECIP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    # The arithmetic of qat.quantizers.range_qparams / fake_quant_values, step by step (see
    # qat.kernels.fake_quant): torch divides by a Python number as x * (1/q) on CUDA, truly on CPU.
    if SYMMETRIC:
        absmax = tl.max(tl.abs(x), 1)
        if RECIP:
            scale = absmax * inv_q_range
        else:
            scale = tl.div_rn(absmax, tl.zeros_like(absmax) + q_range)
        scale = tl.maximum(scale, 1e-8)  # qat.quantizers.EPS
        y = tl.div_rn(x, tl.broadcast_to(scale[:, None], (BLOCK_R, BLOCK_K)))
        q = _clamp(_rint(y), -128.0, 127.0)
        zero = tl.zeros_like(scale)
    else:
        lo = tl.minimum(tl.min(x, 1), 0.0)
        hi = tl.maximum(tl.max(x, 1), 0.0)
        if RECIP:
            scale = (hi - lo) * inv_q_range
        else:
            scale = tl.div_rn(hi - lo, tl.zeros_like(hi) + q_range)
        scale = tl.maximum(scale, 1e-8)
        zero = _clamp(_rint(tl.div_rn(-lo, scale)), 0.0, 255.0)
        y = tl.div_rn(x, tl.broadcast_to(scale[:, None], (BLOCK_R, BLOCK_K)))
        q = _clamp(_rint(y) + zero[:, None], 0.0, 255.0) - 128.0
        tl.store(z_ptr + rows, zero.to(tl.int32) - 128, mask=rmask)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q.to(tl.int32).to(tl.int8), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rmask)


def act_quant_supported(k: int) -> bool:
    return 1 <= k <= ACT_MAX_K


def quantize_act_int8(x2d: torch.Tensor, symmetric: bool):
    m, k = x2d.shape
    x = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    xs = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    xz = None if symmetric else torch.empty(m, 1, dtype=torch.int32, device=x.device)
    if m == 0:
        return xq, xs, xz
    bk = triton.next_power_of_2(k)
    br = max(1, min(triton.next_power_of_2(m), 4096 // bk))
    elems = br * bk
    warps = 2 if elems <= 1024 else 4 if elems <= 2048 else 8 if elems <= 8192 else 16
    q_range = 127 if symmetric else 255
    _act_quant_kernel[(triton.cdiv(m, br),)](
        x, xq, xs, xs if xz is None else xz, m, k, x.stride(0), _reciprocal(q_range), float(q_range),
        SYMMETRIC=bool(symmetric), RECIP=bool(x.is_cuda), BLOCK_R=br, BLOCK_K=bk, num_warps=warps,
    )
    return xq, xs, xz


# ---------------------------------------------------------------------------------------------
# W{2,4,8} x A8: int8 tensor-core dots per weight group, group scales applied in fp32.


@triton.jit
def _a8_kernel(
    xq_ptr, xs_ptr, xz_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
    M, N, K, G, group_size, stride_wn, sub_k, subs_per_group, units_per_split,
    BITS: tl.constexpr, HAS_WZERO: tl.constexpr, ZERO_OFFSET: tl.constexpr, HAS_XZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = offs_m < M, offs_n < N
    if HAS_XZERO:
        xz = tl.load(xz_ptr + offs_m, mask=mmask, other=0)
    out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # A unit is a whole group (sub_k == group_size) or, when split-K needs more programs than there are
    # groups (per-channel weights at small M), an equal part of one; units never straddle groups.
    u0 = pid_k * units_per_split
    u1 = tl.minimum(u0 + units_per_split, G * subs_per_group)
    for u in range(u0, u1):
        grp = u // subs_per_group
        kbase = grp * group_size + (u % subs_per_group) * sub_k
        # sum_k (xq - xz)(q - z) = xq.q - z * sum(xq) - xz * sum(q) + n * xz * z, all exact in int32.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        xsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        wsum = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for kk in range(0, sub_k, BLOCK_K):
            offs_k = kbase + kk + tl.arange(0, BLOCK_K)
            x = tl.load(xq_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=mmask[:, None], other=0)
            q = tl.trans(_load_codes_nk(w_ptr, kbase + kk, offs_n, N, K, stride_wn, BITS, BLOCK_N, BLOCK_K))
            # out_dtype must be named: triton <= 3.6 defaults it to fp32 and rejects an int32 accumulator.
            acc = tl.dot(x, q.to(tl.int8), acc, out_dtype=tl.int32)
            if HAS_XZERO:
                wsum += tl.sum(q, 0)
            if HAS_WZERO:
                xsum += tl.sum(x.to(tl.int32), 1)
        gidx = offs_n.to(tl.int64) * G + grp
        if HAS_XZERO:
            acc -= xz[:, None] * wsum[None, :]
        if HAS_WZERO:
            z = tl.load(z_ptr + gidx, mask=nmask, other=0).to(tl.int32) - ZERO_OFFSET
            acc -= xsum[:, None] * z[None, :]
            if HAS_XZERO:
                acc += (sub_k * xz)[:, None] * z[None, :]
        s = tl.load(s_ptr + gidx, mask=nmask, other=0.0).to(tl.float32)
        out += acc.to(tl.float32) * s[None, :]
    out = out * tl.load(xs_ptr + offs_m, mask=mmask, other=0.0)[:, None]
    _write_out(out_ptr, b_ptr, out, offs_m, offs_n, mmask, nmask, N, HAS_BIAS, ATOMIC, OUT_DTYPE, EMULATE)


def a8_supported(bits: int, group_size: int, k: int) -> bool:
    return (bits in KERNEL_BITS and _pow2_divisor(group_size, 1 << 20) >= 32 and group_size <= MAX_GROUP_A8
            and act_quant_supported(k))


def linear_a8(xq, xs, xz, qweight, scale, zero, bits: int, group_size: int, bias: Optional[torch.Tensor],
              dtype: torch.dtype):
    """(M, K) int8 codes with per-token scales (and zeros) -> (M, N) in dtype; the caller checked support."""
    m, k = xq.shape
    n = qweight.shape[0]
    w, s = qweight.contiguous(), scale.contiguous()
    z, has_zero, zoff = _zero_args(zero, bits, s)
    ng = s.shape[1]
    cfg = gemm_config(m, n, _pow2_divisor(group_size, 128), a8=True)
    subs = 1  # parts per group: only when there are too few groups to split K by whole groups
    if m <= 64:
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        target = (2 * _num_sms(_device_index(xq))) // tiles
        k_tiles = group_size // cfg["BLOCK_K"]
        if ng < target:  # the fewest equal parts (whole K tiles each) that give enough units
            subs = next((d for d in range(1, k_tiles + 1) if k_tiles % d == 0 and ng * d >= target), k_tiles)
    split, per = split_k(m, n, cfg, ng * subs, _num_sms(_device_index(xq)))
    grid, out = _split_out(m, n, cfg, split, dtype, xq.device)
    b = bias.contiguous() if bias is not None else s
    _a8_kernel[grid](
        xq.contiguous(), xs.contiguous(), xs if xz is None else xz.contiguous(), w, s, z, b, out,
        m, n, k, ng, group_size, w.stride(0), group_size // subs, subs, per,
        BITS=bits, HAS_WZERO=has_zero, ZERO_OFFSET=zoff, HAS_XZERO=xz is not None, HAS_BIAS=bias is not None,
        ATOMIC=split > 1, OUT_DTYPE=_DTYPE_CODES[dtype], EMULATE=_interpreted(), **cfg,
    )
    return _finish_split(out, bias, dtype) if split > 1 else out

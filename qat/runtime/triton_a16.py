"""Triton kernels of the integer runtime with 16-bit activations: dequantization of the integer weight,
the W{2,4,8} x A16 tensor-core GEMM and the W{2,4} x A16 GEMV for small M (decode).

The conventions shared with the W*A8 kernels are described in `qat.runtime.triton_common`. Import this
module only after deciding on interpret mode: `triton.jit` reads TRITON_INTERPRET when the kernels are
defined.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..kernels.fake_quant import round_to
from .triton_common import (
    DTYPE_CODES,
    KERNEL_BITS,
    cast,
    device_sms,
    finish_split,
    gemm_config,
    interpreted,
    load_codes_nk,
    pow2_divisor,
    split_k,
    split_out,
    write_out,
    zero_args,
)

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
    q = load_codes_nk(w_ptr, k0, offs_n, N, K, stride_wn, BITS, BLOCK_N, BLOCK_K)  # [BN, BK]
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    gidx = offs_n[:, None].to(tl.int64) * G + (offs_k // group_size)[None, :]
    if HAS_ZERO:
        q = q - (tl.load(z_ptr + gidx, mask=mask, other=0).to(tl.int32) - ZERO_OFFSET)
    w = q.to(tl.float32) * tl.load(s_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
    out = cast(w, OUT_DTYPE, EMULATE)
    tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], out, mask=mask)


def dequant_supported(bits: int, dtype: torch.dtype) -> bool:
    return bits in KERNEL_BITS and dtype in DTYPE_CODES


def dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int, group_size: int,
    in_features: int, dtype: torch.dtype,
) -> torch.Tensor:
    """(N, K) weight in dtype; the caller checked the layout and `dequant_supported`."""
    n, k = qweight.shape[0], in_features
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    if n == 0 or k == 0:
        return out
    w, s = qweight.contiguous(), scale.contiguous()
    z, has_zero, zoff = zero_args(zero, bits, s)
    bn, bk = 32, 128
    grid = (triton.cdiv(n, bn), triton.cdiv(k, bk))
    _dequant_kernel[grid](
        w, s, z, out, n, k, s.shape[1], group_size, w.stride(0),
        BITS=bits, HAS_ZERO=has_zero, ZERO_OFFSET=zoff, OUT_DTYPE=DTYPE_CODES[dtype], EMULATE=interpreted(),
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
        q = tl.trans(load_codes_nk(w_ptr, t * BLOCK_K, offs_n, N, K, stride_wn, BITS, BLOCK_N, BLOCK_K))
        gidx = offs_n.to(tl.int64) * G + (t * BLOCK_K) // group_size
        if HAS_ZERO:
            q = q - (tl.load(z_ptr + gidx, mask=nmask, other=0).to(tl.int32) - ZERO_OFFSET)[None, :]
        s = tl.load(s_ptr + gidx, mask=nmask, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s[None, :]
        if EMULATE:
            # The interpreter's dot misreads bit-cast bf16 tiles: dot in fp32 on values rounded to
            # X_DTYPE, which is what a 16-bit dot with fp32 accumulation computes.
            acc += tl.dot(x.to(tl.float32), round_to(w, X_DTYPE, True), input_precision="ieee")
        elif IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))  # the exact fake-quant weight, rounded once to x.dtype
    write_out(out_ptr, b_ptr, acc, offs_m, offs_n, mmask, nmask, N, HAS_BIAS, ATOMIC, X_DTYPE, EMULATE)


def a16_supported(bits: int, group_size: int, dtype: torch.dtype) -> bool:
    return bits in KERNEL_BITS and dtype in DTYPE_CODES and pow2_divisor(group_size, 1 << 20) >= 16


def _a16_operands(x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]):
    """x with unit column stride, contiguous codes and scales, the bias in x.dtype (F.linear adds it so)."""
    x = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    return x, qweight.contiguous(), scale.contiguous(), bias


def linear_a16(
    x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int,
    group_size: int, bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """(M, K) x.dtype -> (M, N) x.dtype; the caller checked the layout and `a16_supported`."""
    m, k = x2d.shape
    n = qweight.shape[0]
    if m == 0:
        return x2d.new_empty(m, n)
    x, w, s, bias = _a16_operands(x2d, qweight, scale, bias)
    z, has_zero, zoff = zero_args(zero, bits, s)
    cfg = gemm_config(m, n, pow2_divisor(group_size, 128), a8=False)
    split, per = split_k(m, n, cfg, k // cfg["BLOCK_K"], device_sms(x))
    grid, out = split_out(m, n, cfg, split, x.dtype, x.device)
    b = bias if bias is not None else s
    _a16_kernel[grid](
        x, w, s, z, b, out, m, n, k, s.shape[1], group_size, x.stride(0), w.stride(0), per,
        BITS=bits, HAS_ZERO=has_zero, ZERO_OFFSET=zoff, HAS_BIAS=bias is not None, ATOMIC=split > 1,
        X_DTYPE=DTYPE_CODES[x.dtype], IEEE=x.dtype == torch.float32, EMULATE=interpreted(), **cfg,
    )
    return finish_split(out, bias, x.dtype) if split > 1 else out


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
    write_out(out_ptr, b_ptr, y, offs_m, offs_n, mmask, nmask, N, HAS_BIAS, ATOMIC, X_DTYPE, EMULATE)


GEMV_BITS = (2, 4)
GEMV_WORDS = 1024  # packed words per program and step (BLOCK_N * BLOCK_W): 4 KiB of weight


def gemv_supported(bits: int, group_size: int, dtype: torch.dtype) -> bool:
    """Packed widths whose groups hold at least two whole words (a K tile never straddles a group)."""
    return bits in GEMV_BITS and dtype in DTYPE_CODES and pow2_divisor(group_size, 1 << 20) >= 2 * (32 // bits)


def gemv_config(m: int, n: int, bits: int, group_size: int) -> dict:
    """BLOCK_M rows of x share each weight tile (up to 4); BLOCK_W words along K (at most a group's,
    up to 32); BLOCK_N rows so that a step reads GEMV_WORDS words. Untuned: bench/int_kernels.py times it."""
    bm = min(triton.next_power_of_2(max(m, 1)), 4)
    bw = min(32, pow2_divisor(group_size, 1 << 20) // (32 // bits))
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


def linear_gemv(
    x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int,
    group_size: int, bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """(M, K) x.dtype -> (M, N) x.dtype for small M; the caller checked the layout and `gemv_supported`."""
    m, k = x2d.shape
    n = qweight.shape[0]
    if m == 0:
        return x2d.new_empty(m, n)
    x, w, s, bias = _a16_operands(x2d, qweight, scale, bias)
    z = zero.contiguous() if zero is not None else s
    cfg = gemv_config(m, n, bits, group_size)
    k_tiles = k // (cfg["BLOCK_W"] * (32 // bits))
    split, per = gemv_split(m, n, k_tiles, cfg, device_sms(x))
    grid, out = split_out(m, n, cfg, split, x.dtype, x.device)
    b = bias if bias is not None else s
    _gemv_kernel[grid](
        x, w, s, z, b, out, m, n, k, s.shape[1], group_size, x.stride(0), w.stride(0), per,
        BITS=bits, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, ATOMIC=split > 1,
        X_DTYPE=DTYPE_CODES[x.dtype], EMULATE=interpreted(), **cfg,
    )
    return finish_split(out, bias, x.dtype) if split > 1 else out

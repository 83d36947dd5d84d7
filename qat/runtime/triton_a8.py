"""Triton kernels of the integer runtime with 8-bit activations: dynamic per-token int8 activation
quantization and the W{2,4,8} x A8 GEMM (int8 tensor-core dots per weight group).

The conventions shared with the 16-bit-activation kernels are described in `qat.runtime.triton_common`.
Import this module only after deciding on interpret mode: `triton.jit` reads TRITON_INTERPRET when the
kernels are defined.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..device import on_cuda
from ..kernels.fake_quant import clamp, reciprocal, rint
from .triton_common import (
    DTYPE_CODES,
    KERNEL_BITS,
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

ACT_MAX_K = 32768  # longest activation row one program quantizes
MAX_GROUP_A8 = 32768  # 255 * 255 * 32768 < 2**31: a group's exact sum fits the int32 accumulator


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
        q = clamp(rint(y), -128.0, 127.0)
        zero = tl.zeros_like(scale)
    else:
        lo = tl.minimum(tl.min(x, 1), 0.0)
        hi = tl.maximum(tl.max(x, 1), 0.0)
        if RECIP:
            scale = (hi - lo) * inv_q_range
        else:
            scale = tl.div_rn(hi - lo, tl.zeros_like(hi) + q_range)
        scale = tl.maximum(scale, 1e-8)
        zero = clamp(rint(tl.div_rn(-lo, scale)), 0.0, 255.0)
        y = tl.div_rn(x, tl.broadcast_to(scale[:, None], (BLOCK_R, BLOCK_K)))
        q = clamp(rint(y) + zero[:, None], 0.0, 255.0) - 128.0
        tl.store(z_ptr + rows, zero.to(tl.int32) - 128, mask=rmask)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q.to(tl.int32).to(tl.int8), mask=mask)
    tl.store(s_ptr + rows, scale, mask=rmask)


def act_quant_supported(k: int) -> bool:
    return 1 <= k <= ACT_MAX_K


def quantize_act_int8(x2d: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """`qat.runtime.ops.quantize_act_int8` in one pass; the caller checked `act_quant_supported`."""
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
    q_range = 127.5 if symmetric else 255.0  # TensorSpec.q_range of int8 activations (the full signed range)
    _act_quant_kernel[(triton.cdiv(m, br),)](
        x, xq, xs, xs if xz is None else xz, m, k, x.stride(0), reciprocal(q_range), float(q_range),
        SYMMETRIC=bool(symmetric), RECIP=on_cuda(x), BLOCK_R=br, BLOCK_K=bk, num_warps=warps,
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
            q = tl.trans(load_codes_nk(w_ptr, kbase + kk, offs_n, N, K, stride_wn, BITS, BLOCK_N, BLOCK_K))
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
    write_out(out_ptr, b_ptr, out, offs_m, offs_n, mmask, nmask, N, HAS_BIAS, ATOMIC, OUT_DTYPE, EMULATE)


def a8_supported(bits: int, group_size: int, k: int) -> bool:
    return (bits in KERNEL_BITS and pow2_divisor(group_size, 1 << 20) >= 32 and group_size <= MAX_GROUP_A8
            and act_quant_supported(k))


def linear_a8(
    xq: torch.Tensor, xs: torch.Tensor, xz: Optional[torch.Tensor], qweight: torch.Tensor, scale: torch.Tensor,
    zero: Optional[torch.Tensor], bits: int, group_size: int, bias: Optional[torch.Tensor], dtype: torch.dtype,
) -> torch.Tensor:
    """(M, K) int8 codes with per-token scales (and zeros) -> (M, N) in dtype; the caller checked support."""
    m, k = xq.shape
    n = qweight.shape[0]
    w, s = qweight.contiguous(), scale.contiguous()
    z, has_zero, zoff = zero_args(zero, bits, s)
    ng = s.shape[1]
    cfg = gemm_config(m, n, pow2_divisor(group_size, 128), a8=True)
    subs = 1  # parts per group: only when there are too few groups to split K by whole groups
    if m <= 64:
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        target = (2 * device_sms(xq)) // tiles
        k_tiles = group_size // cfg["BLOCK_K"]
        if ng < target:  # the fewest equal parts (whole K tiles each) that give enough units
            subs = next((d for d in range(1, k_tiles + 1) if k_tiles % d == 0 and ng * d >= target), k_tiles)
    split, per = split_k(m, n, cfg, ng * subs, device_sms(xq))
    grid, out = split_out(m, n, cfg, split, dtype, xq.device)
    b = bias.contiguous() if bias is not None else s
    _a8_kernel[grid](
        xq.contiguous(), xs.contiguous(), xs if xz is None else xz.contiguous(), w, s, z, b, out,
        m, n, k, ng, group_size, w.stride(0), group_size // subs, subs, per,
        BITS=bits, HAS_WZERO=has_zero, ZERO_OFFSET=zoff, HAS_XZERO=xz is not None, HAS_BIAS=bias is not None,
        ATOMIC=split > 1, OUT_DTYPE=DTYPE_CODES[dtype], EMULATE=interpreted(), **cfg,
    )
    return finish_split(out, bias, dtype) if split > 1 else out

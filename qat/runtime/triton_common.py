"""Shared pieces of the integer runtime's Triton kernels (`qat.runtime.triton_a16`, `qat.runtime.triton_a8`):
the jitted epilogue, cast and code-unpacking helpers, and the launch helpers (tile configs, split-K).

Conventions shared by the kernels (the layout is described in `qat.runtime.ops`):
- Weight codes are read as signed codes q = u - 2**(bits-1) (int8 weights are stored so), zeros in the
  same domain, so (q - z) is the exact integer the trained weight is a multiple of its scale by.
- Packed words (bits 2 and 4: 32 // bits codes per int32 word) are unpacked in the GEMM main loop,
  so the weight crosses memory at its packed size. Each word is loaded once, as a tile of words, and
  split into its codes by shifts (`load_codes_nk`); the small-M GEMV (`triton_a16._gemv_kernel`) does
  the same on CUDA cores with split-K.
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

from ..device import on_cuda
from ..kernels.fake_quant import round_bf16, round_fp16

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KERNEL_BITS = (2, 4, 8)  # widths the kernels unpack (a code never spans two words)


@triton.jit
def cast(v, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 v -> DTYPE (0 fp32, 1 bf16, 2 fp16), round to nearest even on every backend."""
    if DTYPE == 1:
        if EMULATE:
            return (round_bf16(v).to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return v.to(tl.bfloat16)
    elif DTYPE == 2:
        if EMULATE:
            return round_fp16(v).to(tl.float16)
        else:
            return v.to(tl.float16)
    else:
        return v


@triton.jit
def write_out(out_ptr, b_ptr, y, offs_m, offs_n, mmask, nmask, N, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
               OUT_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """The epilogue of every GEMM here: store the fp32 tile with the bias added, cast to OUT_DTYPE; or,
    under split-K, add it atomically into an fp32 buffer (the launcher adds the bias and casts)."""
    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if not ATOMIC:
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, cast(y, OUT_DTYPE, EMULATE), mask=omask)
    else:
        tl.atomic_add(out_ptr + out_offs, y, mask=omask)


@triton.jit
def load_codes_nk(w_ptr, k0, offs_n, N, K, stride_wn, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
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


def interpreted() -> bool:
    """Whether triton.jit built interpreted functions (TRITON_INTERPRET=1 at import): launchers then pass
    EMULATE, since the interpreter's casts do not round to nearest even."""
    return type(cast).__name__ == "InterpretedFunction"


def zero_args(zero: Optional[torch.Tensor], bits: int, like: torch.Tensor):
    """(pointer tensor, HAS_ZERO, ZERO_OFFSET): kernels subtract ZERO_OFFSET to reach the signed domain."""
    if zero is None:
        return like, False, 0
    return zero.contiguous(), True, (0 if bits == 8 else 1 << (bits - 1))


def pow2_divisor(v: int, cap: int) -> int:
    """The largest power of two dividing v, at most cap."""
    return min(v & -v, cap)


@functools.lru_cache(maxsize=64)
def _num_sms(device_index: int) -> int:
    if device_index < 0:
        return 4  # the interpreter: a few programs are plenty
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_index(t: torch.Tensor) -> int:
    return (t.device.index if t.device.index is not None else torch.cuda.current_device()) if on_cuda(t) else -1


def device_sms(t: torch.Tensor) -> int:
    """SMs of t's device, the split-K target of every launcher; tests patch `_num_sms` here to turn
    split-K off everywhere at once."""
    return _num_sms(_device_index(t))


def gemm_config(m: int, n: int, max_bk: int, a8: bool) -> dict:
    """Tile sizes and warps by M (untuned defaults; bench/int_kernels.py times them). Small M is bound by
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


def split_out(m: int, n: int, cfg: dict, split: int, dtype: torch.dtype, device: torch.device):
    """(grid, out) of a GEMM launch: split-K programs add into fp32 zeros atomically (finished by
    `finish_split`); a single pass writes the output once, in its dtype."""
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]), split)
    if split > 1:
        return grid, torch.zeros(m, n, dtype=torch.float32, device=device)
    return grid, torch.empty(m, n, dtype=dtype, device=device)


def finish_split(out32: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        out32 += bias.float()
    return out32.to(dtype)

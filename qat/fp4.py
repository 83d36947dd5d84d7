"""FP4 (e2m1) elements with NVFP4 and MXFP4 block scales: the reference numerics of the two formats.

A tensor is viewed as blocks (rows of `group_size` values along the reduction dimension, as every other grouped
format here) and each block has one effective fp32 scale `eff`; a value quantizes to q = e2m1(x / eff), q in
{0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6}, round to nearest with ties to even, saturating at 6, and dequantizes to
q * eff.

- MXFP4 (OCP MX): blocks of 32, eff a power of two (an e8m0 exponent). The exponent follows compressed-tensors'
  `generate_mx_scales` (what llm-compressor writes and vLLM reads): the block's max |x| rounded to a power of two
  at e2m1's one mantissa bit (a mantissa of 1.75 or more rounds up), minus e2m1's largest exponent (2). Blocks
  whose max lies in [1.5, 1.75) x 2^e therefore saturate their largest values to 6 x 2^(e-2); that is the format's
  own trade, kept so a folder we write and one llm-compressor writes agree.
- NVFP4: blocks of 16, eff = s / G with s an e4m3 value and G an fp32 scale per tensor (weights) or per token
  (activations). We take G a power of two, the largest one that keeps every block's s = G * max|x| / 6 within
  e4m3 (<= 448): then s = eff * G exactly, so the per-block eff alone determines the encoding (a PTQ or LSQ state
  is one fp32 per block, as for every other format) and export recovers s and G from it bit for bit. Against
  NVIDIA's G = 448 * 6 / amax this loses at most one binade at the bottom of the e4m3 range; e4m3's relative
  precision does not depend on G.

Everything is elementwise or a max over a block, so it runs on any device; `qat.kernels` has the fused version.
"""

from __future__ import annotations

from typing import Optional

import torch

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP4_MAX = 6.0
E4M3_MAX = 448.0
E4M3_TINY = 2.0**-9  # smallest e4m3 subnormal: the floor of a block scale (an all-zero block stays zero)
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127
FP4_BLOCK = {"nvfp4": 16, "mxfp4": 32}


def fp4_round(y: torch.Tensor) -> torch.Tensor:
    """y (fp32) clamped to [-6, 6] and rounded to the nearest e2m1 value, ties to even mantissa; NaN stays NaN.

    Below 2 the e2m1 step is 0.5, in [2, 4) it is 1, in [4, 6] it is 2, so rounding y * 2, y, y / 2 half to even
    (torch.round) is e2m1's tie rule: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
    """
    a = y.abs().clamp_max(FP4_MAX)
    r = torch.where(a < 2.0, (a * 2.0).round() * 0.5, torch.where(a < 4.0, a.round(), (a * 0.5).round() * 2.0))
    return torch.copysign(r, y)


def fp4_codes(q: torch.Tensor) -> torch.Tensor:
    """e2m1 values -> their 4-bit codes (sign << 3 | magnitude index), compressed-tensors' nibble code; int32.

    The index by arithmetic (2a below 2, a + 2 below 4, a / 2 + 4 above, a = |q|), not by comparing with all eight
    values, which took most of an RTN at fp4."""
    a = q.abs()
    mag = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a * 0.5 + 4)).to(torch.int32)
    return (mag | ((q < 0).to(torch.int32) << 3)).contiguous()


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes -> e2m1 values (fp32)."""
    c = codes.long()
    mag = E2M1_VALUES.to(codes.device)[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def _chunks(x: torch.Tensor, global_rows: Optional[int]) -> torch.Tensor:
    """(R, 1) per-block values -> (R / global_rows, global_rows): the blocks that share one tensor scale."""
    n = x.shape[0] if global_rows is None else global_rows
    return x.reshape(-1, max(n, 1))


def nvfp4_global_exponent(eff: torch.Tensor, global_rows: Optional[int] = None) -> torch.Tensor:
    """k per chunk of `global_rows` blocks (all blocks when None) with G = 2^k the largest power of two keeping
    every block's G * eff <= 448; int32, shaped (chunks, 1). Exact: from frexp, not a rounded log."""
    top = _chunks(eff.detach().float(), global_rows).amax(-1, keepdim=True)
    top = torch.where(top > 0, top, torch.ones_like(top))  # an all-zero tensor: any k encodes it; take k = 9
    m, e = torch.frexp(top)  # top = m * 2^e, m in [0.5, 1); 448 = 0.875 * 2^9
    k = torch.where(m <= 0.875, 9 - e, 8 - e)
    return k.clamp(-126, 126).to(torch.int32)


def nvfp4_round_scale(eff: torch.Tensor, global_rows: Optional[int] = None) -> torch.Tensor:
    """Block scales (R, 1) rounded to what NVFP4 stores: e4m3 values over a power-of-two tensor scale."""
    k = nvfp4_global_exponent(eff, global_rows)
    g = torch.ldexp(torch.ones_like(k, dtype=torch.float32), k)
    s = _chunks(eff.float(), global_rows) * g
    s = s.clamp_max(E4M3_MAX).to(torch.float8_e4m3fn).float().clamp_min(E4M3_TINY)
    return (s / g).reshape(eff.shape)


def mxfp4_exponent(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' e8m0 exponent of a block with max |x| = amax: round amax to a power of two at one
    mantissa bit (m >= 1.75 rounds up), minus 2; int32, clamped to e8m0's range."""
    m, e = torch.frexp(amax.float())  # amax = m * 2^e, m in [0.5, 1): 1.75 x 2^(e-1) is m = 0.875
    top = torch.where(m >= 0.875, e, e - 1)
    top = torch.where(amax > 0, top, torch.full_like(top, E8M0_MIN_EXP + 2))
    return (top - 2).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP).to(torch.int32)


def pow2(k: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(k, dtype=torch.float32), k)


def mxfp4_round_scale(eff: torch.Tensor) -> torch.Tensor:
    """A learned scale rounded to the nearest power of two in the log domain (what e8m0 can store)."""
    m, e = torch.frexp(eff.detach().float().clamp_min(2.0**E8M0_MIN_EXP))
    k = torch.where(m >= 2**-0.5, e, e - 1)
    return pow2(k.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP))


def fp4_scales(absmax: torch.Tensor, fmt: str, global_rows: Optional[int] = None) -> torch.Tensor:
    """The effective scale of each block (R, 1) from its max |x| (already clipped by a search, if any)."""
    if fmt == "mxfp4":
        return pow2(mxfp4_exponent(absmax))
    return nvfp4_round_scale(absmax.float() / FP4_MAX, global_rows)


def round_scale(eff: torch.Tensor, fmt: str, global_rows: Optional[int] = None) -> torch.Tensor:
    """A (learned) block scale rounded to the format's storable values, with the identity gradient."""
    with torch.no_grad():
        r = mxfp4_round_scale(eff) if fmt == "mxfp4" else nvfp4_round_scale(eff, global_rows)
    return eff + (r - eff.detach())


def nvfp4_split(eff: torch.Tensor, global_rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored NVFP4 block scales -> (e4m3 block scales s, fp32 tensor scales G), eff == s / G exactly; raises
    if eff was not produced by `nvfp4_round_scale` (a value e4m3 cannot hold)."""
    k = nvfp4_global_exponent(eff, global_rows)
    g = pow2(k)
    s = (_chunks(eff.float(), global_rows) * g).reshape(eff.shape)
    s8 = s.to(torch.float8_e4m3fn)
    if not torch.equal(s8.float(), s):
        raise ValueError("NVFP4 block scales are not e4m3 values over a power-of-two tensor scale; quantize with "
                         "qat.fp4 (fake quant, PTQ) before exporting")
    return s8, g.reshape(-1)


def mxfp4_exponents(eff: torch.Tensor) -> torch.Tensor:
    """Stored MXFP4 block scales (powers of two) -> e8m0 biased exponents (uint8); raises for a non-power of two."""
    m, e = torch.frexp(eff.float())
    if not bool((m == 0.5).all()):
        raise ValueError("MXFP4 block scales are not powers of two; quantize with qat.fp4 before exporting")
    return (e - 1 + 127).to(torch.uint8)


__all__ = [
    "E2M1_VALUES", "FP4_MAX", "FP4_BLOCK", "fp4_round", "fp4_codes", "fp4_values", "fp4_scales", "round_scale",
    "nvfp4_global_exponent", "nvfp4_round_scale", "nvfp4_split", "mxfp4_exponent", "mxfp4_exponents", "pow2",
]

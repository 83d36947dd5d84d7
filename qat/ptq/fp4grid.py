"""The fp4 (NVFP4, MXFP4) block scales PTQ rounds onto: one tensor scale per weight, and the clipping search.

A PTQ result is stored as one effective scale per block (`qat.fp4`), and the frozen lsq quantizer rounds it again
with `qat.fp4.round_scale` over the whole weight (one NVFP4 tensor scale G = 2^k). That rounding is the identity
only when every block scale is an e4m3 value over one G shared by the weight, so every scale here is taken over an
explicit exponent k: the weight's own (from its unclipped max, as `qat.fp4.fp4_scales` takes it) or one the caller
fixes, e.g. a fused experts parameter whose experts GPTQ rounds one at a time, or GPTQ's groups computed as it
reaches them. Any k whose G keeps the largest block within e4m3 gives scales that round to themselves under the G
the quantizer derives (that G is never smaller, and a power-of-two rescaling of an e4m3 value within range is exact).

The clipping search (`scale_method=mse`) enumerates the storable scales themselves: every e4m3 value (NVFP4) or
power of two (MXFP4) from the one just below the most-shrunk range to the one just above the block's max, so it
reaches the neighbouring storable values on both sides, where a shrink grid over [1 - max_shrink, 1] collapses
onto at most two powers of two (MXFP4) and never rounds up (either format).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..fp4 import (
    E4M3_MAX,
    E4M3_TINY,
    FP4_MAX,
    fp4_round,
    mxfp4_exponent,
    nvfp4_global_exponent,
    pow2,
)
from ..spec import FP4_FORMATS, TensorSpec

E4M3_CODE_MAX = 0x7E  # float8_e4m3fn's largest finite positive value (448); 0x7F is NaN


def is_fp4(spec: TensorSpec) -> bool:
    return spec.format in FP4_FORMATS


def block_absmax(rows: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """Each block's (row's) max |x|, or its `spec.percentile`-th percentile of |x| for scale_method=percentile."""
    a = rows.detach().float().abs()
    if spec.scale_method == "percentile":
        n = a.shape[-1]
        k = max(1, min(n, math.ceil(spec.percentile / 100.0 * n)))
        return a.kthvalue(k, dim=-1, keepdim=True).values
    return a.amax(-1, keepdim=True)


def tensor_exponent(rows: torch.Tensor) -> torch.Tensor:
    """The NVFP4 tensor-scale exponent k (G = 2^k) of a weight given as all its blocks: from its unclipped max."""
    return nvfp4_global_exponent(rows.detach().float().abs().amax(-1, keepdim=True) / FP4_MAX).reshape(())


def _nvfp4_at(eff: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Block scales rounded to e4m3 values over G = 2^k (what `qat.fp4.nvfp4_round_scale` does with k fixed)."""
    g = pow2(k)
    s = (eff.float() * g).clamp_max(E4M3_MAX).to(torch.float8_e4m3fn).float().clamp_min(E4M3_TINY)
    return s / g


def storable_scales(absmax: torch.Tensor, fmt: str, k: Optional[torch.Tensor]) -> torch.Tensor:
    """The scale of each block (R, 1) with max |x| = absmax: NVFP4 over 2^k (k None: the blocks' own), MXFP4's
    compressed-tensors exponent; equal to `qat.fp4.fp4_scales` when k is None."""
    if fmt == "mxfp4":
        return pow2(mxfp4_exponent(absmax))
    eff = absmax.float() / FP4_MAX
    return _nvfp4_at(eff, nvfp4_global_exponent(eff).reshape(()) if k is None else k)


def fp4_qparams(rows: torch.Tensor, spec: TensorSpec, k: Optional[torch.Tensor] = None,
                max_shrink: float = 0.5, norm: float = 2.4) -> tuple[torch.Tensor, None]:
    """(block scales (R, 1) fp32, None) of a weight's blocks by the spec's scale method, every NVFP4 scale over
    one tensor scale 2^k (k None: from these rows' unclipped max, so pass all the blocks of a weight at once)."""
    if spec.format == "nvfp4" and k is None:
        k = tensor_exponent(rows)
    if spec.scale_method == "mse":
        return clip_scales(rows, spec.format, k, max_shrink, norm), None
    return storable_scales(block_absmax(rows, spec), spec.format, k), None


def block_error(rows: torch.Tensor, scale: torch.Tensor, norm: float) -> torch.Tensor:
    """sum |x - e2m1(x / s) s|^norm per row, in rows' dtype (float64 rows: a float64 reference)."""
    s = scale.to(rows.dtype)
    return (fp4_round(rows / s) * s - rows).abs().pow(norm).sum(-1, keepdim=True)


def _e4m3_code(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The e4m3 code (uint8 as int64) of the largest e4m3 value <= x (up: the smallest >= x); x >= 0 in range."""
    r = x.clamp(0, E4M3_MAX).to(torch.float8_e4m3fn)
    code = r.view(torch.uint8).long()
    rf = r.float()
    code = torch.where(rf < x, code + 1, code) if up else torch.where(rf > x, code - 1, code)
    return code.clamp(1, E4M3_CODE_MAX)  # from the smallest subnormal: a zero scale stores nothing


def _e4m3_value(code: torch.Tensor) -> torch.Tensor:
    return code.to(torch.uint8).view(torch.float8_e4m3fn).float()


def candidate_range(absmax: torch.Tensor, fmt: str, k: Optional[torch.Tensor], max_shrink: float):
    """(lo, hi) per block, inclusive, of the storable scales the search tries: e4m3 codes over 2^k (NVFP4) or
    exponents (MXFP4), from the largest storable value <= (1 - max_shrink) max|x| / 6 to the smallest >= max|x| / 6.
    """
    top = absmax.float() / FP4_MAX
    bottom = top * (1.0 - max_shrink)
    if fmt == "mxfp4":
        lo = torch.floor(torch.log2(bottom.clamp_min(2.0**-126))).long()
        hi = torch.ceil(torch.log2(top.clamp_min(2.0**-126))).long()
        hi = torch.maximum(hi, mxfp4_exponent(absmax).long())  # the rtn scale is always a candidate
        return torch.minimum(lo, hi).clamp(-127, 127), hi.clamp(-127, 127)
    g = pow2(k)
    return _e4m3_code(bottom * g, up=False), _e4m3_code(top * g, up=True)


def candidate_scale(code: torch.Tensor, fmt: str, k: Optional[torch.Tensor]) -> torch.Tensor:
    """The block scale of a candidate of `candidate_range`."""
    return pow2(code.int()) if fmt == "mxfp4" else _e4m3_value(code) / pow2(k)


@torch.no_grad()
def clip_scales(rows: torch.Tensor, fmt: str, k: Optional[torch.Tensor] = None, max_shrink: float = 0.5,
                norm: float = 2.4) -> torch.Tensor:
    """Per block, the storable scale with the least sum |x - Q(x)|^norm among `candidate_range`'s (the rtn scale
    included; a tie keeps the larger scale, the rtn scale first): GPTQ's clipping search in block-scale space.
    Computed in float64 for float64 rows, else in fp32."""
    r = rows.detach()
    r = r if r.dtype == torch.float64 else r.float()
    absmax = r.abs().amax(-1, keepdim=True).float()
    if fmt == "nvfp4" and k is None:
        k = tensor_exponent(r)
    best = storable_scales(absmax, fmt, k)
    best_err = block_error(r, best, norm)
    lo, hi = candidate_range(absmax, fmt, k, max_shrink)
    for j in range(int((hi - lo).max()) + 1 if len(lo) else 0):
        code = torch.maximum(hi - j, lo)  # from the top: on a tie the larger scale stays
        scale = candidate_scale(code, fmt, k)
        err = block_error(r, scale, norm)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, scale, best)
    return best


__all__ = ["is_fp4", "fp4_qparams", "clip_scales", "candidate_range", "candidate_scale",
           "storable_scales", "tensor_exponent", "block_error"]

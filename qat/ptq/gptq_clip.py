"""GPTQ's clipping search (`ptq.gptq.clip`) with every shrink factor of a row evaluated in one tensor op.

The same choice as `qat.quantizers.mse_qparams` (the scales come from `range_qparams`, the error from
`fake_quant_values`, ties keep the least shrink), without its Python loop over the grid: the candidates' scales
are one (grid + 1, rows, 1) tensor and the rows go through in chunks small enough to stay in cache.

Most of the search's time was |x - Q(x)|^2.4, which torch evaluates one element at a time (about 9.7 ns on a CPU
core against 2.1 ns for log2 and 0.8 ns for exp2). So the search ranks the candidates by exp2(2.4 log2 |e|) first
and computes the exact power only for the rows whose best two candidates are too close for the approximation to
tell apart: the result is the exact search's.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..quantizers import fake_quant_values, range_qparams
from ..spec import TensorSpec

# Elements of (candidates, rows, row length) per chunk: 4 MiB of fp32 (measured on 576 x 1536 at w4g64: 2^18 to 2^21
# within 15%, 2^20 the fastest).
CHUNK = 1 << 20
# exp2(2.4 log2 e) differs from pow(e, 2.4) by an fp32 rounding of the exponent (|2.4 log2 e| < 360 down to the
# smallest subnormal, so under 3e-5 relative per element, and so for their sum), and both sums round alike to a few
# 1e-6: candidates closer than this are ranked by the exact error.
CLOSE = 2e-4


def shrink_candidates(rows: torch.Tensor, spec: TensorSpec, scale_dtype: Optional[torch.dtype], grid: int,
                      max_shrink: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Every shrunk range's (scale, zero) as `range_qparams` maps it: (grid + 1, rows, 1), least shrink first."""
    r = rows.float()
    p = torch.tensor([1.0 - max_shrink * i / grid for i in range(grid + 1)], dtype=torch.float32,
                     device=r.device).view(-1, 1, 1)
    return range_qparams(r.amin(-1, keepdim=True) * p, r.amax(-1, keepdim=True) * p, spec, scale_dtype)


def _errors(x: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: TensorSpec, norm: float,
            exact: bool) -> torch.Tensor:
    """sum |x - Q(x)|^norm per candidate and row: (candidates, rows)."""
    if spec.format == "int":
        # fake_quant_values' integer grid in place: its round-trip STE (round(y) - y) + y is round(y) exactly
        # (|y| <= 2^bits, so both sums are exact in fp32), its clamp the same bounds
        e = torch.div(x, scale)
        if zero is None:
            e.clamp_(spec.qmin, spec.qmax)
        else:
            e.clamp_(spec.qmin - zero, spec.qmax - zero)
        e.round_().mul_(scale).sub_(x).abs_()
    else:
        e = fake_quant_values(x, scale, zero, spec).sub_(x).abs_()
    if exact:
        return e.pow_(norm).sum(-1)
    return e.log2_().mul_(norm).exp2_().sum(-1)


@torch.no_grad()
def clip_qparams(rows: torch.Tensor, spec: TensorSpec, scale_dtype: Optional[torch.dtype] = None, grid: int = 20,
                 max_shrink: float = 0.5, norm: float = 2.4) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`mse_qparams` (integer and nf4 grids): per row, the shrink of its min/max range with the least
    |x - Q(x)|^norm. Returns (scale, zero or None), one per row."""
    if spec.format not in ("int", "nf4"):
        raise ValueError(f"clip_qparams searches integer and nf4 grids, not {spec.format}")
    r = rows.float()
    n_rows, n = r.shape
    scale, zero = shrink_candidates(r, spec, scale_dtype, grid, max_shrink)
    g = scale.shape[0]
    step = max(1, CHUNK // (g * n * (16 if spec.format == "nf4" else 1)))
    best = torch.empty(n_rows, dtype=torch.long, device=r.device)
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        s, z = scale[:, a:b], None if zero is None else zero[:, a:b]
        err = _errors(r[a:b], s, z, spec, norm, exact=False)
        # A tie (an all-zero row: every error 0), a near-tie or a row without a finite error is ranked by the exact
        # error, as mse_qparams ranks it
        close = (err <= err.amin(0) * (1 + CLOSE)).sum(0) != 1
        if bool(close.any()):
            idx = close.nonzero().squeeze(1)
            err[:, idx] = _errors(r[a:b][idx], s[:, idx], None if z is None else z[:, idx], spec, norm, exact=True)
        best[a:b] = err.argmin(0)
    pick = best.view(1, -1, 1)
    return scale.gather(0, pick)[0], None if zero is None else zero.gather(0, pick)[0]

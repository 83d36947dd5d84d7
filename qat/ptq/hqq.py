"""HQQ (Badri & Shaji 2023): calibration-free half-quadratic optimisation of the quantization parameters.

Alternates (1) a sparse "outlier" estimate W_e = shrink_lp(W - Q(W)) (the proximal step of an l_p,
p < 1 error), and (2) a closed-form least-squares fit of the grid to W - W_e. The reference HQQ fits
a fractional zero point only; distqat's grid has integer zero points (what packs), so here the
least-squares step fits the scale and the zero point, then rounds the zero point and refits the
scale. Each row keeps the iterate with the lowest error (iteration 0 is RTN, so HQQ never loses to it).
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from ..quantizers import EPS, _round_to, weight_rows
from ..spec import QuantSpec, TensorSpec
from .config import HQQConfig
from .grid import qparams
from .parts import Rounded, Rounding


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal operator of |x|^p / beta."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp_min(1e-12).pow(p - 1))


@torch.no_grad()
def hqq(
    w: torch.Tensor, spec: TensorSpec, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0,
    kappa: float = 1.01, scale_dtype: Optional[torch.dtype] = None,
):
    """(dequantized weight, codes, scale rows, zero rows) for one weight; int formats only."""
    if spec.format != "int":
        raise ValueError(f"hqq optimises an integer grid; quant.weight.format={spec.format} is not supported")
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    r = weight_rows(w.detach().to(dt), spec)
    s, z = qparams(r, spec, scale_dtype)
    s = s.to(dt)
    z = None if z is None else z.to(dt)
    qmin, qmax = spec.qmin, spec.qmax

    def quant(s, z):
        c = torch.clamp(torch.round(r / s) + (0 if z is None else z), qmin, qmax)
        return c, (c - (0 if z is None else z)) * s

    def error(deq):
        return (r - deq).abs().pow(2).mean(-1, keepdim=True)

    c, deq = quant(s, z)
    best_s, best_z, best_err = s.clone(), None if z is None else z.clone(), error(deq)
    for _ in range(iters):
        target = r - shrink_lp(r - deq, beta, lp_norm)
        if z is None:
            den = (c * c).sum(-1, keepdim=True)
            s_new = torch.where(den > 0, (c * target).sum(-1, keepdim=True) / den.clamp_min(1e-30), s)
        else:
            cm, tm = c.mean(-1, keepdim=True), target.mean(-1, keepdim=True)
            var = ((c - cm) ** 2).sum(-1, keepdim=True)
            a = torch.where(var > 0, ((c - cm) * (target - tm)).sum(-1, keepdim=True) / var.clamp_min(1e-30), s)
            a = torch.where(a > 0, a, s)
            b = tm - a * cm
            z = torch.round(-b / a).clamp(qmin, qmax)
            cz = c - z
            den = (cz * cz).sum(-1, keepdim=True)
            s_new = torch.where(den > 0, (cz * target).sum(-1, keepdim=True) / den.clamp_min(1e-30), a)
        s_new = torch.where(s_new > 0, s_new, s)
        s = _round_to(s_new.float().clamp_min(EPS), scale_dtype).to(dt)
        beta *= kappa
        c, deq = quant(s, z)
        err = error(deq)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    s, z = best_s, best_z
    c, deq = quant(s, z)
    return (deq.reshape(w.shape), c.to(torch.int32).reshape(w.shape), s.float(),
            None if z is None else z.float())


class HQQ(Rounding):
    name: ClassVar[str] = "hqq"
    handles_experts: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    takes_transforms: ClassVar[bool] = False  # it fits the grid to the weight alone, not to its inputs

    def __init__(self, cfg: HQQConfig) -> None:
        self.cfg = cfg

    def check(self, spec: QuantSpec) -> None:
        if spec.activation is not None or spec.kv is not None:
            raise ValueError(
                "ptq.method=hqq is weight-only and calibration-free; quant.activation and quant.kv must be null; "
                "use rtn or smoothquant+rtn for activations"
            )
        if spec.weight is not None and spec.weight.format != "int":
            raise ValueError("ptq.method=hqq needs an integer weight grid, not "
                             f"quant.weight.format={spec.weight.format}")

    def round(self, weight: torch.Tensor, spec: TensorSpec, h: Optional[torch.Tensor],
              nvfp4_exp: Optional[torch.Tensor] = None) -> Rounded:
        c = self.cfg
        return hqq(weight, spec, c.iters, c.lp_norm, c.beta, c.kappa, weight.dtype)

"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales, then a clipping search.

For each group of linears sharing an input (q/k/v after input_layernorm, gate/up after
post_attention_layernorm, o after v when the shapes allow, down after up) the scale
s = mean|x|^alpha (normalised) is searched over a grid of alpha in [0, 1); the weights are
multiplied by s column-wise and s is folded into the preceding op (RMSNorm weight or the previous
linear's rows), so the model stays a plain HF model. The objective is the group's output error
tr(D H D^T) with H = X^T X / n of the calibration inputs (the exact squared error of the linears'
outputs over all calibration tokens; the reference measures the attention/MLP block output
on a token subsample instead). The clipping search then shrinks each row/group's range to
minimise the same output error (q/k are not clipped, as in the reference), and clamps the weight.
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import nn

from ..quantizers import fake_quant_values, range_qparams, weight_rows
from ..spec import TensorSpec
from .blocks import Group, fold, foldable
from .config import AWQConfig
from .grid import output_error, rtn
from .parts import Transform


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], h: torch.Tensor, x_mean: torch.Tensor, spec: TensorSpec,
                 grid: int = 20, scale_dtype: Optional[torch.dtype] = None):
    """(best per-input-channel scale s, {alpha: error}) for linears sharing the input with stats h, x_mean."""
    dt = h.dtype
    x_mean = x_mean.to(dt)
    best, best_s, errors = float("inf"), None, {}
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w in weights:
            wd = w.to(dt)
            ws = wd * s
            deq = rtn(ws, spec, scale_dtype)[0].to(dt)
            err += output_error(wd, deq / s, h)
        errors[alpha] = err
        if err < best:
            best, best_s = err, s
    return best_s, errors


@torch.no_grad()
def search_clip(w: torch.Tensor, h: torch.Tensor, spec: TensorSpec, grid: int = 20, max_shrink: float = 0.5,
                scale_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight clamped per row (per group) to the shrunk range with the least output error."""
    if spec.granularity == "tensor" or spec.format != "int":
        return w
    dt = h.dtype
    n_out, n_in = w.shape
    rows = weight_rows(w.to(dt), spec)
    k = rows.shape[-1]
    ng = n_in // k
    hg = torch.stack([h[g * k:(g + 1) * k, g * k:(g + 1) * k] for g in range(ng)])  # (ng, k, k)
    lo, hi = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    best_err = torch.full_like(lo, float("inf"))
    best_p = torch.ones_like(lo)
    for i in range(int(max_shrink * grid) + 1):
        p = 1.0 - i / grid
        s, z = range_qparams((lo * p).float(), (hi * p).float(), spec, scale_dtype)
        c = torch.minimum(torch.maximum(rows, lo * p), hi * p)  # what is applied: clamp, then round
        d = (fake_quant_values(c, s, z, spec).to(dt) - rows).reshape(n_out, ng, k)
        err = torch.einsum("ogi,gij,ogj->og", d, hg, d).reshape(-1, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    clipped = torch.minimum(torch.maximum(rows, lo * best_p), hi * best_p)
    return clipped.reshape(w.shape).to(w.dtype)


class AWQ(Transform):
    name: ClassVar[str] = "awq"
    needs_hessian: ClassVar[bool] = True

    def __init__(self, cfg: AWQConfig) -> None:
        self.cfg = cfg

    @torch.no_grad()
    def apply(self, layer: nn.Module, group: Group, specs: dict[str, TensorSpec]) -> list[str]:
        names = list(specs)
        if not names:
            return []
        c, h = self.cfg, group.stats.h
        if foldable(layer, group):
            ws = [layer.get_submodule(n).weight for n in names]
            s, _ = search_scale(ws, h, group.stats.absmean, specs[names[0]], c.grid, ws[0].dtype)
            fold(layer, group, s)
        if c.clip:
            for n in names:
                # As the reference: q/k errors reach the output through q k^T, which this objective does not see.
                if n.endswith(("q_proj", "k_proj")):
                    continue
                w = layer.get_submodule(n).weight
                w.copy_(search_clip(w, h, specs[n], c.clip_grid, c.max_shrink, w.dtype))
        return names

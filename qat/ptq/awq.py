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

from collections.abc import Callable, Sequence
from functools import partial
from typing import ClassVar, Optional

import torch
from torch import nn

from ..quantizers import fake_quant_values, range_qparams, weight_rows
from ..spec import TensorSpec
from .blocks import Group, Routed, fold, foldable
from .config import AWQConfig
from .grid import output_error, rtn
from .moe import down_foldable, down_inputs, fold_down, hessian
from .parts import Transform


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], h: torch.Tensor, x_mean: torch.Tensor, spec: TensorSpec,
                 grid: int = 20, scale_dtype: Optional[torch.dtype] = None,
                 extra: Sequence[Callable[[torch.Tensor], float]] = ()):
    """(best per-input-channel scale s, {alpha: error}) for linears sharing the input with stats h, x_mean;
    each of `extra` adds its own output error at s (fused experts on their routed tokens)."""
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
        err += sum(f(s) for f in extra)
        errors[alpha] = err
        if err < best:
            best, best_s = err, s
    return best_s, errors


@torch.no_grad()
def search_clip(w: torch.Tensor, h: torch.Tensor, spec: TensorSpec, grid: int = 20, max_shrink: float = 0.5,
                scale_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The weight clamped per row (per group) to the shrunk range with the least output error."""
    if spec.granularity == "tensor" or spec.format not in ("int", "nvfp4", "mxfp4"):
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


def experts_error(module: nn.Module, param: str, spec: TensorSpec, routed: Routed, n: int, s: torch.Tensor) -> float:
    """The squared output error of a fused experts parameter (up, reading the group's input) rounded after scaling
    its columns by s, each expert on its routed tokens, per token of the layer (as tr(D H D^T) with H = X^T X / n)."""
    w = module.canonical(param).detach()
    err = 0.0
    for e in range(w.shape[0]):
        x = routed.tokens(e).float()
        if len(x):
            we = w[e].float()
            deq = rtn(we * s, spec, w.dtype)[0].float() / s
            err += float((x @ (deq - we).T).pow(2).sum())
    return err / max(n, 1)


class AWQ(Transform):
    name: ClassVar[str] = "awq"
    needs_hessian: ClassVar[bool] = True
    handles_experts: ClassVar[bool] = True

    def __init__(self, cfg: AWQConfig) -> None:
        self.cfg = cfg

    @torch.no_grad()
    def apply(self, layer: nn.Module, group: Group, specs: dict[str, TensorSpec]) -> list[str]:
        if group.prev_kind == "experts":
            return self._experts_down(layer, group, specs)
        names = [n for n in specs if n in group.names]
        moe = [(n, p) for n, p in (k.rpartition(".")[::2] for k in specs)
               if n in group.routed and p == layer.get_submodule(n).expert_layout.up]
        if not names and not moe:
            return []
        c, h = self.cfg, group.stats.h
        if foldable(layer, group):
            ws = [layer.get_submodule(n).weight for n in names]
            extra = [partial(experts_error, layer.get_submodule(n), p, specs[f"{n}.{p}"], group.routed[n],
                             group.stats.n) for n, p in moe]
            spec = specs[names[0]] if names else specs["{}.{}".format(*moe[0])]
            dtype = ws[0].dtype if ws else layer.get_submodule(moe[0][0]).canonical(moe[0][1]).dtype
            s, _ = search_scale(ws, h, group.stats.absmean, spec, c.grid, dtype, extra)
            fold(layer, group, s)
        if c.clip:
            for n in names:
                # As the reference: q/k errors reach the output through q k^T, which this objective does not see.
                if n.endswith(("q_proj", "k_proj")):
                    continue
                w = layer.get_submodule(n).weight
                w.copy_(search_clip(w, h, specs[n], c.clip_grid, c.max_shrink, w.dtype))
            for n, p in moe:
                w = layer.get_submodule(n).canonical(p)
                for e in range(w.shape[0]):
                    x = group.routed[n].tokens(e)
                    if len(x):
                        w[e] = search_clip(w[e], hessian(x), specs[f"{n}.{p}"], c.clip_grid, c.max_shrink, w.dtype)
        return names + [f"{n}.{p}" for n, p in moe]

    def _experts_down(self, layer: nn.Module, group: Group, specs: dict[str, TensorSpec]) -> list[str]:
        """Each expert's up -> down on its routed tokens: the scale (where it folds into the up rows), then the
        clipping of its down weight."""
        (name,) = group.experts
        module = layer.get_submodule(name)
        key = f"{name}.{module.expert_layout.down}"
        if key not in specs or name not in group.routed:
            return []
        c, spec, routed = self.cfg, specs[key], group.routed[name]
        up, down = module.canonical(module.expert_layout.up), module.canonical(module.expert_layout.down)
        for e in range(down.shape[0]):
            x = routed.tokens(e)
            if not len(x):
                continue
            a = down_inputs(module, x, e, up, quantize=False).float()
            if down_foldable(module):
                s, _ = search_scale([down[e]], hessian(a), a.abs().mean(0), spec, c.grid, down.dtype)
                fold_down(module, e, s)
                a = a / s
            if c.clip:
                down[e] = search_clip(down[e], hessian(a), spec, c.clip_grid, c.max_shrink, down.dtype)
        return [key]

"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before W8A8.

Per input channel j of a group of linears sharing an input, s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha);
the activations are divided by s (folded into the preceding RMSNorm weight, or the previous linear's
output rows where no norm precedes: v_proj -> o_proj when the shapes match, up_proj -> down_proj)
and the weights' columns multiplied by s. The fp model computes the same function afterwards.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..coverage import routers
from ..spec import QuantSpec, TensorSpec
from .blocks import Group, experts_weight, fold, foldable
from .config import SmoothQuantConfig
from .moe import down_foldable, down_inputs, fold_down
from .parts import Transform


@torch.no_grad()
def smooth_scales(weights: list[torch.Tensor], x_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp_min(1e-5)
    s = x_absmax.float().clamp_min(1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp_min(1e-5)


class SmoothQuant(Transform):
    name: ClassVar[str] = "smoothquant"
    handles_experts: ClassVar[bool] = True

    def __init__(self, cfg: SmoothQuantConfig) -> None:
        self.cfg = cfg

    def check(self, spec: QuantSpec) -> None:
        if spec.activation is None:
            raise ValueError(
                "ptq.method=smoothquant migrates activation outliers for W8A8; the spec quantizes no activations "
                "(use quant.scheme=w8a8)"
            )

    @torch.no_grad()
    def apply(self, layer: nn.Module, group: Group, specs: dict[str, TensorSpec]) -> list[str]:
        # Every foldable group is smoothed, its excluded linears too: the fold is exact in full precision. A router
        # is folded but left out of the weights' range: it stays full precision.
        if group.prev_kind == "experts":
            return self._experts_down(layer, group, specs)
        if not foldable(layer, group):
            return []
        skip = routers(layer)
        ws = [layer.get_submodule(n).weight for n in group.names if n not in skip]
        ups = [(n, layer.get_submodule(n)) for n in group.experts]
        ws += [experts_weight(m, "up").reshape(-1, experts_weight(m, "up").shape[-1]) for _, m in ups]
        fold(layer, group, smooth_scales(ws, group.stats.absmax, self.cfg.alpha))
        return [n for n in specs if n in group.names] + [f"{n}.{m.expert_layout.up}" for n, m in ups
                                                         if f"{n}.{m.expert_layout.up}" in specs]

    def _experts_down(self, layer: nn.Module, group: Group, specs: dict[str, TensorSpec]) -> list[str]:
        """Each expert's up -> down, smoothed on its routed tokens' activations where the scale folds into the up
        rows (act(gate) * up)."""
        (name,) = group.experts
        module = layer.get_submodule(name)
        if not down_foldable(module) or name not in group.routed:
            return []
        up, down = module.canonical(module.expert_layout.up), module.canonical(module.expert_layout.down)
        for e in range(down.shape[0]):
            x = group.routed[name].tokens(e)
            if len(x):
                a = down_inputs(module, x, e, up, quantize=False)
                fold_down(module, e, smooth_scales([down[e]], a.abs().amax(0), self.cfg.alpha))
        key = f"{name}.{module.expert_layout.down}"
        return [key] if key in specs else []

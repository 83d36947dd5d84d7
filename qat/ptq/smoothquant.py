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

from ..spec import QuantSpec, TensorSpec
from .blocks import Group, fold, foldable
from .config import SmoothQuantConfig
from .parts import Transform


@torch.no_grad()
def smooth_scales(weights: list[torch.Tensor], x_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp_min(1e-5)
    s = x_absmax.float().clamp_min(1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp_min(1e-5)


class SmoothQuant(Transform):
    name: ClassVar[str] = "smoothquant"

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
        # Every foldable group is smoothed, its excluded linears too: the fold is exact in full precision.
        if not foldable(layer, group):
            return []
        ws = [layer.get_submodule(n).weight for n in group.names]
        fold(layer, group, smooth_scales(ws, group.stats.absmax, self.cfg.alpha))
        return list(specs)

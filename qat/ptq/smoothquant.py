"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights before W8A8.

Per input channel j of a group of linears sharing an input, s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha);
the activations are divided by s (folded into the preceding RMSNorm weight, or the previous linear's
output rows where no norm precedes: v_proj -> o_proj when the shapes match, up_proj -> down_proj)
and the weights' columns multiplied by s. The fp model computes the same function afterwards.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def smooth_scales(weights: list[torch.Tensor], x_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0).clamp_min(1e-5)
    s = x_absmax.float().clamp_min(1e-5).pow(alpha) / w_max.pow(1 - alpha)
    return s.clamp_min(1e-5)

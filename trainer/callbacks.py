"""Callbacks: per-layer quantizer statistics every N steps."""

from __future__ import annotations

import lightning as L
import torch

from qat.linear import QuantLinear
from qat.quantizers import weight_rows


@torch.no_grad()
def weight_quant_stats(layer: QuantLinear) -> dict[str, float]:
    """Scale range and the fraction of weights outside the grid (clipped) of one layer's weight quantizer."""
    q = layer.weight_quantizer
    w = layer.weight.detach()
    scale, zero = q.qparams(w)
    rows = weight_rows(w, q.spec).float()
    y = rows / scale + (zero if zero is not None else 0)
    clipped = ((y < q.spec.qmin - 0.5) | (y > q.spec.qmax + 0.5)).float().mean()
    return {"scale_min": float(scale.min()), "scale_max": float(scale.max()), "clipped": float(clipped)}


class QuantStats(L.Callback):
    """Logs quant/<layer>/{scale_min,scale_max,clipped} every `every` optimizer steps (and at step 0)."""

    def __init__(self, every: int = 100) -> None:
        self.every = every

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or getattr(self, "_last", None) == step:
            return
        self._last = step
        metrics: dict[str, float] = {}
        student = getattr(module, "student", module)
        for name, m in student.named_modules():
            if isinstance(m, QuantLinear) and m.weight_quantizer is not None and m.weight.numel() > 0:
                for k, v in weight_quant_stats(m).items():
                    metrics[f"quant/{name}/{k}"] = v
        if metrics and trainer.logger is not None:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

"""Callbacks: per-layer quantizer statistics every N steps; progress lines where no progress bar is drawn; ctrl-C
that stops training even when its KeyboardInterrupt is swallowed."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Optional, TextIO

import lightning as L
import torch

from qat.experts import routing_load
from qat.io.progress import ProgressLines
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
    """Logs quant/<layer>/{scale_min,scale_max,clipped} every `every` optimizer steps (and at step 0), and for an
    MoE student the tokens each expert received since the previous log (`routing_metrics`)."""

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
        metrics.update(routing_metrics(routing_load(student)))
        if metrics and trainer.logger is not None:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)


def routing_metrics(load: dict[str, list[int]]) -> dict[str, float]:
    """routing/<experts module>/expert_<e>: tokens routed to each expert since the last log (this rank's), and
    routing/<module>/max_over_mean: the busiest expert's load over the mean (1 is perfectly balanced)."""
    metrics: dict[str, float] = {}
    for name, counts in load.items():
        total = sum(counts)
        if not total:
            continue
        for e, n in enumerate(counts):
            metrics[f"routing/{name}/expert_{e}"] = float(n)
        metrics[f"routing/{name}/max_over_mean"] = max(counts) * len(counts) / total
    return metrics


class TrainProgress(L.Callback):
    """Where the progress bar is off (stderr is not a terminal), one line on rank 0 every `every_s` seconds, and
    after the first and the last optimizer step of the run:

        train: step 12/40 (30%) | loss 2.314 | 1,850 tokens/s | elapsed 1m05s | ETA 2m53s

    loss: the mean over the optimizer steps since the previous line. tokens/s: the tokens of the optimizer steps
    done (the blocks' tokens on every rank) over the time since training started."""

    def __init__(self, every_s: float = 30.0, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.stream, self.clock = every_s, stream, clock
        self.lines: Optional[ProgressLines] = None

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.lines = ProgressLines("train", trainer.max_steps, self.every_s, unit="step", stream=self.stream,
                                   clock=self.clock)
        self.lines.start(trainer.global_step)  # a resumed run starts past 0
        self._step = trainer.global_step
        self._pending = 0  # tokens of the micro-batches of the optimizer step under way
        self._loss: Optional[torch.Tensor] = None  # summed step losses since the last line, kept on the device
        self._steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.lines is None or not trainer.is_global_zero:
            return
        self._pending += _batch_tokens(batch) * max(1, trainer.world_size)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):  # a micro-batch's loss, divided by grad_accum: they sum to the step's
            loss = loss.detach().float()
            self._loss = loss if self._loss is None else self._loss + loss
        if trainer.global_step == self._step:
            return  # accumulating: the optimizer step is not done
        self._steps += trainer.global_step - self._step
        self._step = trainer.global_step
        tokens, self._pending = self._pending, 0
        if self.lines.update(trainer.global_step, tokens, self._fields()) is not None:
            self._loss, self._steps = None, 0

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.lines is not None and trainer.is_global_zero and self._step > self.lines.first:
            self.lines.finish(self._step, self._fields())

    def _fields(self) -> tuple[str, ...]:
        if self._loss is None or not self._steps:
            return ()
        return (f"loss {float(self._loss) / self._steps:#.4g}",)


def _batch_tokens(batch: Any) -> int:
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


class CtrlC(L.Callback):
    """Ctrl-C stops training even where the KeyboardInterrupt it raises is swallowed.

    Python raises KeyboardInterrupt in whatever Python code runs when the signal is handled, and CPython clears an
    exception raised inside a finalizer: io.IOBase.__del__ evaluating fsspec's pure-Python `closed` property,
    during Lightning's checkpoint save, lost a ctrl-C in 3 of 5 tries (the run trained to its end). The handler
    here raises as Python's own does and also records the signal; the next batch boundary raises again if the
    first one went nowhere. Installed only over Python's default handler (a process started with SIGINT ignored,
    or a user's own handler, is left alone), and only in the main thread, where signals are handled.
    """

    def __init__(self) -> None:
        self.pending = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.pending = True
        raise KeyboardInterrupt

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._handler)

    def uninstall(self) -> None:
        # Only while ours is in place: Lightning ignores SIGINT while it shuts down after a ctrl-C.
        if signal.getsignal(signal.SIGINT) == self._handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.install()

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.check()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.check()

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self.uninstall()

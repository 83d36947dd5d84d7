"""What a training run does when the cluster takes the machine back: a stop signal (train.stop_signals; SLURM's
--signal, Kubernetes' TERM) finishes the step under way, writes a checkpoint and ends the run with exit 75, so that
train.resume=auto continues it as if nothing had happened.

The checkpoint is written where ModelCheckpoint writes its own (the end of a step, after every other callback), so
a stop checkpoint is the same kind of file as a periodic one and resumes the same way (bit for bit: the data order
comes back from the step). Ranks agree before they stop: a signal that reached one rank stops them all at the same
step (one all-reduce of a flag per step), since the checkpoint is a collective under DeepSpeed.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from qat.io.signals import Stopped, signal_name, signal_number


class StopAwareCheckpoint(ModelCheckpoint):
    """ModelCheckpoint every `save_every` steps as `step=<n>.ckpt`, and one more when a stop signal arrived."""

    def __init__(self, ckpt_dir: Path, save_every: int, keep_last: int, stop_signals: list[str]) -> None:
        super().__init__(dirpath=ckpt_dir, filename="step={step}", auto_insert_metric_name=False,
                         every_n_train_steps=save_every, save_top_k=keep_last, monitor="step", mode="max",
                         save_last=False)
        self.signals = [signal_number(s) for s in stop_signals]
        self.received: Optional[int] = None
        self.stopped: Optional[Stopped] = None
        self._before: dict[int, Any] = {}
        self._step = -1

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum  # acted on at the end of the step: raising here would lose the step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._step = trainer.global_step
        # Ours replace Lightning's own TERM handler for the fit (it stops without a checkpoint, and broadcasts from
        # inside the handler); its teardown puts back what was there before the fit.
        if threading.current_thread() is threading.main_thread():
            self._before = {s: signal.signal(s, self._handler) for s in self.signals}

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for s, h in self._before.items():
            if signal.getsignal(s) == self._handler:
                signal.signal(s, h)
        self._before = {}
        super().teardown(trainer, pl_module, stage)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step == self._step:
            return  # a micro-batch of an accumulated step: the step is not done
        self._step = trainer.global_step
        signum = self._agreed(trainer)
        if signum is None:
            return
        path = Path(self.dirpath) / f"step={trainer.global_step}.ckpt"
        if self._last_global_step_saved != trainer.global_step:
            self._save_checkpoint(trainer, str(path))
        trainer.should_stop = True
        self.stopped = Stopped(signal_name(signum), f"checkpoint {path} (step {trainer.global_step}) written; the "
                               "same command continues from it (train.resume=auto)")

    def _agreed(self, trainer: L.Trainer) -> Optional[int]:
        """The signal one of the ranks received (the highest number when several did), None when none did."""
        local = self.received or 0
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            flag = torch.tensor([local], dtype=torch.int32, device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        return local or None

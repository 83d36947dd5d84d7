"""`BlockData` as a LightningDataModule: the Trainer's ranks and restored step pick each rank's batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from torch import nn
from torch.utils.data import DataLoader

from data.blocks import BlockData

from .config import DataConfig, TrainConfig


class TextDataModule(BlockData, L.LightningDataModule):
    """Packed blocks of `data.path` (see data.blocks); without a Trainer it reads as a single process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        L.LightningDataModule.__init__(self)
        BlockData.__init__(self, *args, **kwargs)

    @classmethod
    def from_config(cls, data: DataConfig, train: TrainConfig, *, tokenizer: Any, seed: int, world: int,
                    teacher: str, load_teacher: Callable[[], nn.Module]) -> TextDataModule:
        """A run's blocks: `data` says which text and how it is cut, `train` how many samples the run draws
        (max_steps x grad_accum x micro_batch_size on each of `world` ranks) and whether the teacher's top-k
        logits are cached (`teacher` names it in the cache key, `load_teacher` loads it when the cache is built)."""
        return cls(
            path=data.path, text_field=data.text_field, seq_len=data.seq_len,
            chat_template=data.chat_template, micro_batch_size=train.micro_batch_size, seed=seed,
            tokenizer=tokenizer, val_fraction=data.val_fraction,
            total_samples=train.max_steps * train.grad_accum * train.micro_batch_size * world,
            teacher_topk=train.teacher_topk, teacher=teacher, load_teacher=load_teacher,
            topk_batch_size=train.micro_batch_size, format=data.format, packing=data.packing,
        )

    def _consumed(self) -> int:
        t = self.trainer
        return t.global_step * t.accumulate_grad_batches * self.micro_batch_size * t.world_size

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        if t is None:
            return self.dataloader()
        return self.dataloader(t.global_rank, t.world_size, self._consumed)

    def val_dataloader(self) -> DataLoader:
        t = self.trainer
        if t is None:
            return BlockData.val_dataloader(self)
        return BlockData.val_dataloader(self, t.global_rank, t.world_size)

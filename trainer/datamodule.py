"""`BlockData` as a LightningDataModule: the Trainer's ranks and restored step pick each rank's batches."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from data.blocks import BlockData


class TextDataModule(BlockData, L.LightningDataModule):
    """Packed blocks of `data.path` (see data.blocks); without a Trainer it reads as a single process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        L.LightningDataModule.__init__(self)
        BlockData.__init__(self, *args, **kwargs)

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

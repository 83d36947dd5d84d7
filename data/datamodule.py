"""The LightningDataModule: documents -> packed blocks (cached) -> train/val split -> resumable loaders.

Data order is a function of (seed, samples already consumed): the sampler walks seeded permutations
of the training blocks, each rank taking every world-th index, starting after what the restored
global step has consumed. So `resume=auto` continues with exactly the batches an uninterrupted run
would have seen, and Lightning's own distributed sampler is not used (use_distributed_sampler=False).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .packing import pack
from .sources import BUNDLED_TEXT, load_documents
from .text import distqat_home


class BlockDataset(Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class ResumableSampler(Sampler[int]):
    """Indices of epoch-wise seeded permutations, this rank's share, from a start offset.

    `consumed()` says how many samples (over all ranks) were used before this iteration begins.
    """

    def __init__(self, n: int, seed: int, rank: int, world: int, total: int,
                 consumed: Callable[[], int] = lambda: 0) -> None:
        self.n, self.seed, self.rank, self.world, self.total, self.consumed = n, seed, rank, world, total, consumed

    def __iter__(self) -> Iterator[int]:
        start = self.consumed()
        perm_epoch, perm = -1, None
        for k in range(start + self.rank, self.total, self.world):
            epoch, i = divmod(k, self.n)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=g), epoch
            yield int(perm[i])

    def __len__(self) -> int:
        return max(0, len(range(self.consumed() + self.rank, self.total, self.world)))


class TextDataModule(L.LightningDataModule):
    def __init__(
        self, path: str = BUNDLED_TEXT, text_field: str = "text", seq_len: int = 1024, chat_template: bool = False,
        micro_batch_size: int = 1, val_fraction: float = 0.05, seed: int = 0, tokenizer=None, split: str = "train",
        total_samples: Optional[int] = None, cache_dir: Optional[Path] = None,
    ) -> None:
        super().__init__()
        self.path, self.text_field, self.seq_len = path, text_field, seq_len
        self.chat_template, self.micro_batch_size, self.val_fraction = chat_template, micro_batch_size, val_fraction
        self.seed, self.tokenizer, self.split = seed, tokenizer, split
        self.total_samples = total_samples
        self.cache_dir = Path(cache_dir) if cache_dir else distqat_home() / "cache" / "packed"
        self.stats: dict[str, int] = {}
        self.train_blocks: Optional[torch.Tensor] = None
        self.val_blocks: Optional[torch.Tensor] = None

    # -- packing, cached ------------------------------------------------------------------------

    def _cache_key(self) -> str:
        p = Path(self.path).expanduser()
        files = sorted(p.rglob("*")) if p.is_dir() else [p] if p.exists() else []
        sig = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
        tok = self.tokenizer
        key = json.dumps([self.path, self.split, sig, getattr(tok, "name_or_path", ""), len(tok), tok.eos_token_id,
                          self.seq_len, self.chat_template, self.text_field])
        return hashlib.sha256(key.encode()).hexdigest()[:24]

    def packed_blocks(self) -> torch.Tensor:
        from safetensors.torch import load_file, save_file

        if self.tokenizer is None:
            raise ValueError("TextDataModule needs the model's tokenizer")
        path = self.cache_dir / f"{self._cache_key()}.safetensors"
        if path.exists():
            return load_file(str(path))["blocks"]
        docs = load_documents(self.path, self.tokenizer, self.split, self.text_field, self.chat_template)
        blocks, dropped = pack(docs, self.seq_len, self.tokenizer.eos_token_id)
        if len(blocks) < 2:
            raise ValueError(f"data.path={self.path!r} gives {len(blocks)} block(s) of data.seq_len={self.seq_len} "
                             "tokens; give more text or a shorter data.seq_len")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".packed-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file({"blocks": blocks.contiguous()}, tmp, metadata={"dropped": str(dropped)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return blocks

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_blocks is not None:
            return
        blocks = self.packed_blocks()
        n_val = max(1, int(round(len(blocks) * self.val_fraction))) if self.val_fraction > 0 else 0
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(self.seed))
        self.val_blocks, self.train_blocks = blocks[order[:n_val]], blocks[order[n_val:]]
        self.stats = {"blocks": len(blocks), "train_blocks": len(self.train_blocks), "val_blocks": n_val,
                      "tokens": blocks.numel()}

    # -- loaders --------------------------------------------------------------------------------

    def _consumed(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return trainer.global_step * trainer.accumulate_grad_batches * self.micro_batch_size * trainer.world_size

    def dataloader(self, rank: int = 0, world_size: int = 1, consumed: Callable[[], int] = lambda: 0) -> DataLoader:
        """The training loader of one rank; usable without Lightning."""
        assert self.train_blocks is not None, "call setup() first"
        total = self.total_samples or len(self.train_blocks)
        sampler = ResumableSampler(len(self.train_blocks), self.seed, rank, world_size, total, consumed)
        return DataLoader(BlockDataset(self.train_blocks), batch_size=self.micro_batch_size, sampler=sampler,
                          drop_last=True)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        return self.dataloader(t.global_rank, t.world_size, self._consumed)

    def val_dataloader(self) -> DataLoader:
        assert self.val_blocks is not None
        t = self.trainer
        mine = self.val_blocks[t.global_rank :: t.world_size] if t is not None else self.val_blocks
        return DataLoader(BlockDataset(mine), batch_size=self.micro_batch_size)

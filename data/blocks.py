"""Training data: documents -> packed blocks (cached) -> train/val split -> rank-sharded loaders.

`BlockData` holds it all without Lightning; `trainer.datamodule.TextDataModule` is the same object as a
LightningDataModule, whose hooks call these methods with the Trainer's ranks and restored step.

Sampling. The training loader always carries our own `ResumableSampler`, a `DistributedSampler`
subclass. Lightning never replaces a DistributedSampler, so the order is ours whether the Trainer has
`use_distributed_sampler` on or off (`distqat train` turns it off); Lightning's injected sampler would
be seeded by the global seed rather than ours and would restart the epoch on resume.
`dataloader(rank, world_size)` gives one rank's loader (default: the torch.distributed process group
when initialized, else a single process).

Order. With `total_samples` (what `distqat train` passes: max_steps x global batch) the run reads one
stream of block indices: position k is block perm_e[k % n], e = k // n, where perm_e is a permutation
of the n training blocks seeded by (seed, e); rank r reads positions r, r + world, ... . Each iteration
starts after the samples the restored global step has consumed, so a resumed run sees exactly the
batches an uninterrupted one would have, and one Lightning epoch is the whole run. Without
`total_samples`, each Lightning epoch is one pass (perm_epoch, via `set_epoch`), cut to a multiple of
the world size so every rank gets as many batches; a run resumed mid-epoch restarts that epoch.

Formats. `format="text"` packs documents into blocks of real tokens (items: input_ids, attention_mask of
ones, labels = input_ids). `format="instructions"` renders conversations through the chat template
(data.instructions) and either packs whole examples into blocks keeping their boundaries (`packing=True`,
data.packing.pack_bins: an example is cut only when longer than a block, each block's tail padded, positions
restarting at 0 for each example) or puts one per block, right-padded (`packing=False`); the cache file then
also holds the bool `assistant` and `attention` masks, and when packed the int32 `positions`. Items add
`assistant_mask` (long 0/1), labels = input_ids with -100 wherever the assistant mask is 0 (prompts, padding),
the real attention mask (0 on padding) and, when packed, `position_ids`: data.packing.model_inputs then calls the
model with those positions and no 2-D mask, so attention stays inside each example. Blocks without any
assistant token are dropped (nothing to learn; a batch of them would make a NaN loss). Teacher top-k caching
works for both: the teacher runs on the same model inputs, and with right padding and causal attention its
logits at real tokens do not depend on the padding.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from qat.io.atomic import atomic_file
from qat.io.env import distqat_home, rank_world
from qat.io.models import load_tokenizer

from .instructions import load_conversations, pad_examples, render
from .packing import pack, pack_bins
from .sources import BUNDLED, load_documents
from .teacher_cache import build_topk_cache, load_topk_cache, topk_cache_file
from .text import BUNDLED_INSTRUCTIONS, BUNDLED_TEXT, INSTRUCTIONS_VERSION

CACHE_VERSION = 1  # bump when packing changes what a cached file holds
# The same for instruction blocks (in their key only: text keys stay as they are). 2: packing keeps example
# boundaries (whole examples, padded tails, positions); a version-1 file would be read as boundary-free blocks.
INSTRUCTION_BLOCKS_VERSION = 2
FORMATS = ("text", "instructions")
# "assistant" and "attention": bool (n, seq_len); for packed instruction blocks "positions": int32 (n, seq_len)
Masks = dict[str, torch.Tensor]


class BlockDataset(Dataset):
    """Packed blocks, each with the teacher's cached top-k logits when those are given, and for instruction
    data its assistant and attention masks and, when packed with boundaries, each token's position in its example."""

    def __init__(self, blocks: torch.Tensor, topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 assistant: Optional[torch.Tensor] = None, attention: Optional[torch.Tensor] = None,
                 positions: Optional[torch.Tensor] = None) -> None:
        self.blocks = blocks
        self.topk = topk
        self.assistant, self.attention, self.positions = assistant, attention, positions

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i].long()
        if self.assistant is None:
            item = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        else:
            answer = self.assistant[i].bool()
            real = self.attention[i].long() if self.attention is not None else torch.ones_like(ids)
            item = {"input_ids": ids, "attention_mask": real, "labels": ids.masked_fill(~answer, -100),
                    "assistant_mask": answer.long()}
            if self.positions is not None:
                item["position_ids"] = self.positions[i].long()
        if self.topk is not None:
            item["teacher_topk_values"] = self.topk[0][i]
            item["teacher_topk_indices"] = self.topk[1][i]
        return item


class ResumableSampler(DistributedSampler):
    """This rank's share of the seeded block order, from `consumed()` samples (over all ranks) on."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, total: Optional[int] = None,
                 consumed: Callable[[], int] = lambda: 0) -> None:
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.n, self.total, self.consumed = n, total, consumed

    def _positions(self) -> range:
        if self.total is None:
            lo, hi = self.epoch * self.n, (self.epoch + 1) * self.n
        else:
            lo, hi = self.consumed(), self.total
        # Equal counts on every rank: one rank with an extra batch would hang the others' collectives.
        w = self.num_replicas
        return range(lo + self.rank, lo + max(0, hi - lo) // w * w, w)

    def __iter__(self) -> Iterator[int]:
        perm_pass, perm = -1, torch.empty(0, dtype=torch.long)
        for k in self._positions():
            e, i = divmod(k, self.n)
            if e != perm_pass:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                perm_pass, perm = e, torch.randperm(self.n, generator=g)
            yield int(perm[i])

    def __len__(self) -> int:
        return len(self._positions())


def _rank_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    return (rank, world_size) if rank is not None and world_size is not None else rank_world()


class BlockData:
    """Packed blocks of `seq_len` tokens from `data.path`, split into train/val by `seed`.

    `format`: "text" (documents) or "instructions" (conversations, see data.instructions), whose `packing`
    packs several per block (True) or pads one per block (False). `stats` (after setup) counts documents
    (instructions: examples, truncated examples, assistant tokens), blocks and tokens for logging.
    """

    def __init__(
        self, path: str = BUNDLED_TEXT, text_field: str = "text", seq_len: int = 1024, chat_template: bool = False,
        micro_batch_size: int = 1, val_fraction: float = 0.05, seed: int = 0, tokenizer=None,
        model_path: Optional[str] = None, split: str = "train", num_workers: int = 0,
        total_samples: Optional[int] = None, cache_dir: Optional[Path] = None,
        teacher_topk: int = 0, teacher: Optional[str] = None,
        load_teacher: Optional[Callable[[], torch.nn.Module]] = None, topk_batch_size: int = 4,
        format: str = "text", packing: bool = True,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"data.format={format!r}: use one of {', '.join(FORMATS)}")
        if format == "text" and not packing:
            raise ValueError("data.packing=false applies to data.format=instructions only; text is always packed")
        self.format, self.packing = format, packing
        self.path, self.text_field, self.seq_len, self.chat_template = path, text_field, seq_len, chat_template
        self.micro_batch_size, self.val_fraction, self.seed = micro_batch_size, val_fraction, seed
        self._tokenizer, self.model_path, self.split = tokenizer, model_path, split
        self.num_workers, self.total_samples = num_workers, total_samples
        self.cache_dir = Path(cache_dir) if cache_dir else distqat_home() / "cache" / "packed"
        self.stats: dict[str, int] = {}
        self.train_blocks: Optional[torch.Tensor] = None
        self.val_blocks: Optional[torch.Tensor] = None
        self.train_masks: Optional[Masks] = None  # instruction data only
        self.val_masks: Optional[Masks] = None
        # Cached teacher logits (data.teacher_cache): k > 0 needs the teacher's folder and a loader for it.
        self.teacher_topk, self.teacher, self.load_teacher = teacher_topk, teacher, load_teacher
        self.topk_batch_size = topk_batch_size
        self.train_topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.val_topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        if teacher_topk and (teacher is None or load_teacher is None):
            raise ValueError("teacher_topk > 0 needs teacher= (its folder) and load_teacher=")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.model_path is None:
                raise ValueError("BlockData needs the model's tokenizer: pass tokenizer= or model_path=")
            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    # -- packing, cached ------------------------------------------------------------------------

    def cache_file(self) -> Path:
        """Where the packed blocks of this (data, tokenizer, packing settings) live."""
        sig: list = []
        where = self.path
        if self.path not in BUNDLED:
            p = Path(self.path).expanduser().resolve()
            where = str(p)
            files = sorted(p.rglob("*")) if p.is_dir() else [p] if p.exists() else []
            for f in files:
                rel = f.relative_to(p) if p.is_dir() else Path(f.name)
                if f.is_file() and not any(part.startswith(".") for part in rel.parts):  # temp files of writers
                    st = f.stat()
                    sig.append((str(rel), st.st_size, st.st_mtime_ns))
        tok = self.tokenizer
        template = getattr(tok, "chat_template", None) if self.chat_template else None
        extra: list = []  # empty for text: the keys of existing text caches stay as they are
        if self.format != "text":
            extra += [INSTRUCTION_BLOCKS_VERSION, self.format, self.packing, str(getattr(tok, "chat_template", None)),
                      tok.pad_token_id]
        if self.path == BUNDLED_INSTRUCTIONS:
            extra.append(INSTRUCTIONS_VERSION)
        key = json.dumps([CACHE_VERSION, where, self.split, sig, getattr(tok, "name_or_path", ""), len(tok),
                          tok.eos_token_id, str(template), self.seq_len, self.chat_template, self.text_field, *extra])
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"

    def packed(self) -> tuple[torch.Tensor, dict[str, int]]:
        """All blocks (int32) and their counts: read from the cache, else tokenized, packed and cached."""
        tensors, meta = self.packed_tensors()
        return tensors["blocks"], meta

    def packed_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """What the cache file holds: "blocks" (int32 (n, seq_len)), for instructions also "assistant" and
        "attention" (bool (n, seq_len)) and, when packed, "positions" (int32 (n, seq_len)); and the counts."""
        path = self.cache_file()
        if path.exists():
            try:
                with safe_open(str(path), "pt") as f:
                    return {k: f.get_tensor(k) for k in f.keys()}, {k: int(v) for k, v in f.metadata().items()}
            except Exception as e:  # unreadable (disk trouble): packing again is always safe
                warnings.warn(f"packing again: cannot read {path}: {e}", stacklevel=2)
        tok = self.tokenizer
        tensors, meta = self._pack_text(tok) if self.format == "text" else self._pack_instructions(tok)
        blocks = tensors["blocks"]
        if blocks.numel() and int(blocks.max()) >= len(tok):
            raise ValueError(f"data.path={self.path!r} holds token id {int(blocks.max())}, beyond the model's "
                             f"vocabulary of {len(tok)}: it was tokenized for another model")
        tensors["blocks"] = blocks.to(torch.int32)  # half the bytes of int64; every vocabulary fits
        # Written whole, then renamed: a killed writer or a concurrent rank never leaves a torn file.
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})
        return tensors, meta

    def _pack_text(self, tok) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        if tok.eos_token_id is None:
            raise ValueError("the model's tokenizer has no EOS token to separate packed documents")
        docs = load_documents(self.path, tok, self.split, self.text_field, self.chat_template)
        blocks, dropped = pack(docs, self.seq_len, tok.eos_token_id)
        return {"blocks": blocks}, {"documents": len(docs), "dropped_tokens": dropped}

    def _pack_instructions(self, tok) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        examples = [render(chat, tok) for chat in load_conversations(self.path, self.split)]
        meta = {"examples": len(examples)}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("the model's tokenizer has neither a pad nor an EOS token to pad blocks with")
        if self.packing:
            tensors, counts = pack_bins(examples, self.seq_len, pad)
            meta.update(counts)
        else:
            blocks, assistant, attention = pad_examples(examples, self.seq_len, pad)
            tensors = {"blocks": blocks, "assistant": assistant, "attention": attention}
            meta["truncated_examples"] = sum(len(ids) > self.seq_len for ids, _ in examples)
        keep = tensors["assistant"].any(dim=1)  # a block with no answer token teaches nothing
        tensors = {k: v[keep] for k, v in tensors.items()}
        meta.update(no_answer_blocks=int((~keep).sum()), assistant_tokens=int(tensors["assistant"].sum()),
                    padding_tokens=int((~tensors["attention"]).sum()))
        return tensors, meta

    def topk_file(self) -> Optional[Path]:
        return topk_cache_file(self.cache_file(), self.teacher, self.teacher_topk) if self.teacher_topk else None

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node first, so the other ranks only read the caches.
        tensors, _ = self.packed_tensors()
        if self.teacher_topk:
            build_topk_cache(self.topk_file(), tensors["blocks"], self.teacher_topk, self.load_teacher,
                             self.topk_batch_size, tensors.get("positions"))

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_blocks is not None:
            return
        tensors, meta = self.packed_tensors()
        blocks = tensors["blocks"]
        n = len(blocks)
        if n == 0 and self.format == "text":
            raise ValueError(f"data.path={self.path!r} gives fewer than data.seq_len={self.seq_len} tokens; "
                             "give more text or a shorter data.seq_len")
        if n == 0:
            raise ValueError(f"data.path={self.path!r} gives no block of data.seq_len={self.seq_len} tokens with an "
                             "assistant token in it; give more examples or a longer data.seq_len")
        n_val = 0 if self.val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * self.val_fraction)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        self.val_blocks, self.train_blocks = blocks[order[:n_val]], blocks[order[n_val:]]
        masks = {k: v for k, v in tensors.items() if k != "blocks"}
        if masks:
            self.val_masks = {k: v[order[:n_val]] for k, v in masks.items()}
            self.train_masks = {k: v[order[n_val:]] for k, v in masks.items()}
        if self.teacher_topk:
            path = self.topk_file()
            if not path.exists():
                raise FileNotFoundError(f"the teacher's top-k cache {path} is missing; run prepare_data() first")
            values, indices = load_topk_cache(path, blocks)
            self.val_topk = (values[order[:n_val]], indices[order[:n_val]])
            self.train_topk = (values[order[n_val:]], indices[order[n_val:]])
        self.stats = {**meta, "blocks": n, "train_blocks": n - n_val, "val_blocks": n_val,
                      "tokens": blocks.numel(), "train_tokens": (n - n_val) * self.seq_len}

    # -- loaders --------------------------------------------------------------------------------

    def _loader(self, blocks: torch.Tensor, sampler, drop_last: bool, topk=None,
                masks: Optional[Masks] = None) -> DataLoader:
        return DataLoader(BlockDataset(blocks, topk, **(masks or {})), batch_size=self.micro_batch_size,
                          sampler=sampler,
                          drop_last=drop_last, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))  # seeds the workers

    def dataloader(self, rank: Optional[int] = None, world_size: Optional[int] = None,
                   consumed: Callable[[], int] = lambda: 0) -> DataLoader:
        """One rank's training loader; usable without Lightning. `consumed()`: samples (over all ranks)
        already used, read when iteration starts (only with total_samples)."""
        assert self.train_blocks is not None, "call setup() first"
        rank, world_size = _rank_world(rank, world_size)
        n, unit = len(self.train_blocks), world_size * self.micro_batch_size
        total = None if self.total_samples is None else self.total_samples // unit * unit
        if (total if total is not None else n - n % world_size) < unit:
            raise ValueError(f"{n} training blocks make no batch of {self.micro_batch_size} on each of "
                             f"{world_size} ranks; give more text, a shorter data.seq_len or a smaller batch")
        sampler = ResumableSampler(n, self.seed, rank, world_size, total, consumed)
        return self._loader(self.train_blocks, sampler, drop_last=True, topk=self.train_topk, masks=self.train_masks)

    def val_dataloader(self, rank: Optional[int] = None, world_size: Optional[int] = None) -> DataLoader:
        """One rank's validation loader, padded to equal counts per rank (a few blocks seen twice) so no rank
        waits in a collective."""
        assert self.val_blocks is not None, "call setup() first"
        rank, world_size = _rank_world(rank, world_size)
        sampler = (DistributedSampler(range(len(self.val_blocks)), world_size, rank, shuffle=False)
                   if world_size > 1 else None)
        return self._loader(self.val_blocks, sampler, drop_last=False, topk=self.val_topk, masks=self.val_masks)

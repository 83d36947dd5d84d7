"""The training modes (`train.mode`): what differs between a run that trains a fake-quantized student (QAT) and one
that trains adapters on a frozen packed base (QLoRA). `run_train` picks one from MODES and asks it; the rest of
a run (data, strategy, Lightning module, checkpoints, resume) is the same for every mode."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol

from lightning.pytorch.strategies import Strategy
from torch import nn

from data.blocks import BlockData
from qat.io.folders import Folder

from . import qlora
from .config import RunConfig
from .init import check_init, prepare_start
from .models import build_models, consolidate, enable_checkpointing, load_teacher, model_summary
from .optim import lightning_precision


@dataclass
class Built:
    """What a mode's `build` gives the run: the student, its trainable parameters already marked (requires_grad);
    the frozen teacher, or None (a cached top-k teacher, or no distillation); the lines printed before training.
    `base_fingerprint` says what a checkpoint holds: None, the whole module; a fingerprint, the trainable
    parameters and that fingerprint, which a resume checks against the base it rebuilt (QATModule)."""

    student: nn.Module
    teacher: Optional[nn.Module]
    report: str
    base_fingerprint: Optional[str] = None


class TrainingMode(Protocol):
    """One `train.mode`. An object serves one run: `finish` may use what `build` kept."""

    def check(self, cfg: RunConfig) -> None:
        """One-line errors for settings the mode cannot train with, before anything loads."""

    def precision(self, cfg: RunConfig, deepspeed: bool) -> str:
        """Lightning's precision setting for this run."""

    def build(self, cfg: RunConfig) -> Built:
        """The student (and teacher) to train, after the data module and the strategy exist."""

    def finish(self, cfg: RunConfig, student: nn.Module, tokenizer, out_dir: Path, dm: BlockData,
               strategy: Strategy) -> Optional[Path]:
        """Called on every rank after the last checkpoint: writes what the run delivers and returns its folder
        (None where this rank wrote nothing)."""


class QAT:
    """LLM-QAT: the fake-quantized student (from train.init's start, see trainer/init.py), every trainable
    parameter in its master weights; the end writes the consolidated student as one folder."""

    def check(self, cfg: RunConfig) -> None:
        check_init(cfg)

    def precision(self, cfg: RunConfig, deepspeed: bool) -> str:
        return lightning_precision(cfg.train.master_weights, cfg.train.autocast, deepspeed=deepspeed)

    def build(self, cfg: RunConfig) -> Built:
        student, teacher, report = build_models(cfg, prepare_start(cfg))
        return Built(student, teacher, f"{report}\n{model_summary(student, teacher)}")

    def finish(self, cfg: RunConfig, student: nn.Module, tokenizer, out_dir: Path, dm: BlockData,
               strategy: Strategy) -> Optional[Path]:
        # Every rank: under ZeRO-3 gathering the shards is collective.
        return consolidate(student, tokenizer, out_dir / "model", strategy)


class QLoRA:
    """QLoRA (trainer/qlora.py): adapters on the packed base of model.name_or_path; checkpoints hold the adapters
    and the base's fingerprint; the end (rank 0) writes the adapters, the held-out losses and lora.merge's model."""

    def __init__(self) -> None:
        self.folder: Optional[Folder] = None
        self.base_print: Optional[str] = None

    def check(self, cfg: RunConfig) -> None:
        qlora.check(cfg)
        check_init(cfg)  # refuses train.init and the block-wise stage, which set up a QAT student

    def precision(self, cfg: RunConfig, deepspeed: bool) -> str:
        # Every tensor keeps its dtype (the adapters lora.dtype, the base the model's)
        return "32-true"

    def build(self, cfg: RunConfig) -> Built:
        student, teacher, self.base_print, self.folder = qlora.build(cfg, lambda: load_teacher(cfg),
                                                                     enable_checkpointing)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        report = (f"qlora: {trainable} adapter parameters on the packed base of {self.folder.name} "
                  f"({self.folder.kind.value})")
        return Built(student, teacher, report, self.base_print)

    def finish(self, cfg: RunConfig, student: nn.Module, tokenizer, out_dir: Path, dm: BlockData,
               strategy: Strategy) -> Optional[Path]:
        if strategy.global_rank != 0:
            return None
        return qlora.finish(cfg, student, tokenizer, out_dir, dm, self.folder, self.base_print)


MODES: dict[str, type[TrainingMode]] = {"qat": QAT, "qlora": QLoRA}


def training_mode(cfg: RunConfig) -> TrainingMode:
    """The mode train.mode names, ready for one run."""
    return MODES[cfg.train.mode]()

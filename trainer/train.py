"""`distqat train`: the run of a training mode (trainer/modes.py: LLM-QAT distillation, then one consolidated HF
folder; or QLoRA) with Lightning (+ DeepSpeed ZeRO): data, strategy, checkpoints and resume."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from qat.io.atomic import clean_stale
from qat.io.env import rank_world
from qat.io.models import load_tokenizer
from qat.io.progress import bars_wanted

from .callbacks import CtrlC, QuantStats, TrainProgress
from .cluster import cluster_layout, cluster_plugins, join_run
from .commands import prepare_output
from .config import RunConfig, save_config
from .datamodule import TextDataModule
from .faults import StopAwareCheckpoint
from .init import lr_relative
from .models import load_teacher, master_weights
from .modes import training_mode
from .module import QATModule
from .quiet import quiet_libraries
from .schema import Resume
from .strategy import make_strategy
from .watchdog import WatchPeers, finished

CHECKPOINT = re.compile(r"^step=(\d+)\.ckpt$")


def checkpoints(ckpt_dir: Path) -> list[Path]:
    """This run's checkpoints (files, or folders under DeepSpeed), oldest first; other names are not ours."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step=*") if (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def check_checkpoint(path: Path, how: str) -> None:
    """A checkpoint picked to resume from is complete: every file torch.save wrote (a zip archive) reads back
    with its checksums. `how` names the setting that picked it."""
    files = [path] if path.is_file() else sorted((path / "checkpoint").glob("*.pt")) if path.is_dir() else []
    fix = "delete it to resume from the one before, or set train.resume=never"
    if not files:
        raise ValueError(f"{how} picked {path}, which holds no checkpoint file; {fix}")
    for f in files:
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError) as e:
            bad = str(e)
        if bad:
            raise ValueError(f"{how} picked {path}, which is not a readable checkpoint ({f.name}: {bad}); {fix}")


def find_resume(ckpt_dir: Path, resume: str) -> Optional[str]:
    """resume=auto: the newest checkpoint under ckpt_dir (None when there is none); never: None. The one picked
    is checked whole first."""
    how = Resume.parse(resume)
    if how.kind == "never":
        return None
    if how.kind == "path":
        if not Path(how.path).exists():
            raise FileNotFoundError(f"train.resume={resume!r} does not exist; use auto, never or a checkpoint path")
        check_checkpoint(Path(how.path), f"train.resume={resume}")
        return how.path
    found = checkpoints(ckpt_dir)
    if not found:
        return None
    check_checkpoint(found[-1], "train.resume=auto")
    return str(found[-1])


def prune_checkpoints(ckpt_dir: Path, keep_last: int) -> None:
    """Only the newest keep_last checkpoints stay: a run killed between saving one and pruning the oldest
    left one too many, which no later run would otherwise remove."""
    for p in checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _loggers(out_dir: Path, flush_every: int = 100) -> list:
    """CSV always (written out with each checkpoint, so a killed run loses no row a resume would not log
    again, but for one window: Lightning saves a step's checkpoint before it logs that step, so a kill between
    the two loses that step's row); TensorBoard as well where it is installed (some cluster images lack it)."""
    loggers = [CSVLogger(out_dir, name="logs", flush_logs_every_n_steps=flush_every)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(out_dir, name="tb"))
    else:
        print("distqat: tensorboard not installed; logging CSV only (pip install tensorboard for curves)",
              file=sys.stderr)
    return loggers


def run_train(cfg: RunConfig, devices: Optional[int] = None, max_time: Optional[str] = None) -> Path:
    """`distqat train`: train in the mode train.mode names; returns the folder it delivers (QAT: the consolidated
    student)."""
    out_dir = Path(cfg.output_dir)
    quiet_libraries()
    # From here on (and in the config.yaml saved with the run) auto and null are what they resolved to here.
    start = cfg.train.start
    cfg = replace(cfg, train=replace(cfg.train, master_weights=master_weights(cfg), lr_relative=lr_relative(cfg),
                                     init=start.method or start.path or start.kind, lr=cfg.train.peak_lr))
    # The frozen teacher is in eval mode on purpose; Lightning's warning about it would only alarm users.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # A mid-epoch resume is exact here (ResumableSampler restores the data order from the step); Lightning
    # cannot see that and says the opposite.
    warnings.filterwarnings("ignore", message=r".*not resumable\. This can cause unreliable results.*")
    L.seed_everything(cfg.seed, workers=True)
    layout = cluster_layout(devices)
    join_run(layout)
    devices, world, num_nodes = layout.devices, layout.world, layout.num_nodes
    mode = training_mode(cfg)
    mode.check(cfg)
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    dm = TextDataModule.from_config(
        cfg.data, cfg.train, tokenizer=tok, seed=cfg.seed, world=world, teacher=cfg.model.name_or_path,
        load_teacher=lambda: load_teacher(
            cfg, f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else None))
    strategy = make_strategy(cfg.distributed, cfg.train, devices * num_nodes)  # refuses bad settings before loading
    on_deepspeed = "deepspeed" in type(strategy).__name__.lower()
    precision = mode.precision(cfg, on_deepspeed)
    built = mode.build(cfg)
    module = QATModule(built.student, built.teacher, cfg.train, seed=cfg.seed, base_fingerprint=built.base_fingerprint)
    ckpt_dir = out_dir / "checkpoints"
    prepare_output(out_dir)
    if rank_world()[0] == 0:
        clean_stale(ckpt_dir)  # a checkpoint a kill or a full disk left half-written, under its temp name
        prune_checkpoints(ckpt_dir, cfg.train.keep_last)
    checkpoint = StopAwareCheckpoint(ckpt_dir, cfg.train.save_every, cfg.train.keep_last, cfg.train.stop_signals)
    trainer = L.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=devices, num_nodes=num_nodes, strategy=strategy, plugins=[*cluster_plugins(layout)],
        precision=precision,
        max_steps=cfg.train.max_steps, accumulate_grad_batches=cfg.train.grad_accum,
        gradient_clip_val=None if on_deepspeed else cfg.train.grad_clip,
        logger=_loggers(out_dir, cfg.train.save_every),
        callbacks=[checkpoint, WatchPeers(cfg.distributed.peer_timeout_s), LearningRateMonitor(logging_interval="step"),
                   QuantStats(cfg.train.stats_every), CtrlC(),
                   # Where no bar is drawn (a log), steady whole lines instead.
                   *([] if bars_wanted() else [TrainProgress(cfg.train.progress_every_s)])],
        log_every_n_steps=1, max_time=max_time, deterministic=False, use_distributed_sampler=False,
        limit_val_batches=cfg.train.val_batches, val_check_interval=cfg.train.val_every,
        check_val_every_n_epoch=None, num_sanity_val_steps=0,
        enable_progress_bar=bars_wanted(),
        # Its table showed the freshly loaded student as in eval mode (Lightning switches it to train mode after)
        # and went to stdout; model_summary's line, in the report, says what it said that matters.
        enable_model_summary=False,
    )
    if trainer.global_rank == 0:
        save_config(cfg, out_dir)
        print(built.report, file=sys.stderr)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=find_resume(ckpt_dir, cfg.train.resume), weights_only=True)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns ctrl-C into exit(1) after its shutdown: report it as ours
            raise KeyboardInterrupt from None
        raise
    if checkpoint.stopped is not None:  # a stop signal: its checkpoint is written; no final save, no model folder
        raise checkpoint.stopped
    # Collective under DeepSpeed; the full state (optimizer, loops), so that a later run can resume from it.
    trainer.save_checkpoint(ckpt_dir / f"step={trainer.global_step}.ckpt", weights_only=False)
    if trainer.global_rank == 0:
        prune_checkpoints(ckpt_dir, cfg.train.keep_last)
    final = mode.finish(cfg, built.student, tok, out_dir, dm, trainer.strategy)
    trainer.strategy.barrier()
    finished()
    return final or out_dir / "model"

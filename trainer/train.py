"""`distqat train`: LLM-QAT distillation with Lightning (+ DeepSpeed ZeRO), then one consolidated HF folder."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import sys
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import Strategy

from qat.apply import QuantReport, quantize_model
from qat.fast import enable as enable_speedups
from qat.io.atomic import atomic_dir
from qat.io.env import rank_world
from qat.io.models import load_model, load_tokenizer
from qat.io.progress import bars_wanted
from qat.linear import QuantLinear

from . import qlora
from .callbacks import CtrlC, QuantStats, TrainProgress
from .commands import prepare_output
from .config import RunConfig, save_config
from .datamodule import TextDataModule
from .init import check_init, load_student, lr_relative, prepare_start
from .module import QATModule
from .optim import lightning_precision, resolve_master_weights
from .quiet import quiet_libraries
from .schema import Resume
from .strategy import make_strategy


def master_weights(cfg: RunConfig) -> str:
    """cfg's train.master_weights resolved for this machine and strategy: "bf16" or "fp32" (auto: bf16 on CUDA,
    fp32 on CPU and under DeepSpeed offload)."""
    d = cfg.distributed
    return resolve_master_weights(cfg.train.master_weights, d.offload_optimizer or d.offload_params)


def build_models(cfg: RunConfig, start: Optional[Path] = None
                 ) -> tuple[torch.nn.Module, Optional[torch.nn.Module], Union[QuantReport, str]]:
    """(student, teacher, report): the student in its master weights' dtype, fake-quantized by cfg.quant or
    loaded from `start` (train.init's folder, see trainer/init.py), the teacher frozen (bf16 on GPU)."""
    dtype = "bfloat16" if master_weights(cfg) == "bf16" else "float32"
    if start is None:
        student = load_model(cfg.model.name_or_path, dtype, cfg.model.attn_implementation,
                             cfg.model.trust_remote_code)
        report: Union[QuantReport, str] = quantize_model(student, cfg.quant)
    else:
        student = load_student(cfg, start, dtype)
        report = f"student: starts from {start} (train.init={cfg.train.init})"
    teacher = None if cfg.train.teacher_topk else _load_teacher(cfg)
    fake_quant = any(isinstance(m, QuantLinear) for m in student.modules())
    changed = enable_speedups(student, [n for n in cfg.train.speedups if n != "compile"]) if fake_quant else []
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(student)
    student.config.use_cache = False
    if "compile" in cfg.train.speedups:
        student.compile()  # in place: Lightning and DeepSpeed wrap the same module
        changed.append("compile: the student runs under torch.compile")
    if changed and rank_world()[0] == 0:
        print("\n".join(f"speed-up {line}" for line in changed), file=sys.stderr)
    return student, teacher, report


def enable_checkpointing(model: torch.nn.Module, reentrant: bool = False) -> None:
    """Recompute the decoder's activations in backward (non-reentrant by default, so frozen inputs work)."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _load_teacher(cfg: RunConfig, device: Optional[str] = None) -> torch.nn.Module:
    # bf16 on GPUs (memory); fp32 on CPU, where it is also the faster dtype. ("auto")
    teacher = load_model(cfg.model.name_or_path, "auto", cfg.model.attn_implementation,
                         cfg.model.trust_remote_code)
    return teacher.eval().to(device) if device else teacher.eval()


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


def consolidate(student: torch.nn.Module, tokenizer, out: Path, strategy: Strategy) -> Optional[Path]:
    """Write the trained student once (rank 0) as safetensors + spec, gathering ZeRO-3 shards. Each tensor keeps
    the dtype it was trained in (fp32 masters are saved fp32, not rounded), so the folder is the model trained."""
    gather = contextlib.nullcontext()
    if getattr(strategy, "zero_stage_3", False):
        import deepspeed  # lazy: only ZeRO-3 runs gather shards, and DeepSpeed costs seconds to import

        gather = deepspeed.zero.GatheredParameters(list(student.parameters()), modifier_rank=None)
    with gather:
        if strategy.global_rank != 0:
            return None
        with atomic_dir(out) as tmp:
            state = {k: v.detach() for k, v in student.state_dict().items()}
            student.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return out


def model_summary(student: torch.nn.Module, teacher: Optional[torch.nn.Module]) -> str:
    """One line: the student's parameters, trained ones and dtype; the teacher's."""
    def millions(n: int) -> str:
        return f"{n / 1e6:,.1f}M"

    params = list(student.parameters())
    trained = sum(p.numel() for p in params if p.requires_grad)
    dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in params if p.requires_grad}))
    line = f"student: {millions(sum(p.numel() for p in params))} parameters, {millions(trained)} trained in {dtypes}"
    if teacher is not None:
        line += f"; teacher: {millions(sum(p.numel() for p in teacher.parameters()))} parameters, frozen"
    return line


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
    """`distqat train`: distil the teacher into the student; returns the consolidated student's folder."""
    out_dir = Path(cfg.output_dir)
    quiet_libraries()
    # From here on (and in the config.yaml saved with the run) auto is what it resolved to on this machine.
    cfg = replace(cfg, train=replace(cfg.train, master_weights=master_weights(cfg), lr_relative=lr_relative(cfg)))
    # The frozen teacher is in eval mode on purpose; Lightning's warning about it would only alarm users.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # A mid-epoch resume is exact here (ResumableSampler restores the data order from the step); Lightning
    # cannot see that and says the opposite.
    warnings.filterwarnings("ignore", message=r".*not resumable\. This can cause unreliable results.*")
    L.seed_everything(cfg.seed, workers=True)
    if devices is None:
        devices = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
    world = int(os.environ.get("WORLD_SIZE", devices))
    num_nodes = max(1, world // max(devices, 1))
    qlora_mode = cfg.train.mode == "qlora"
    if qlora_mode:
        qlora.check(cfg)
    check_init(cfg)
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    dm = TextDataModule(
        path=cfg.data.path, text_field=cfg.data.text_field, seq_len=cfg.data.seq_len,
        chat_template=cfg.data.chat_template, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.seed,
        tokenizer=tok, val_fraction=cfg.data.val_fraction,
        total_samples=cfg.train.max_steps * cfg.train.grad_accum * cfg.train.micro_batch_size * world,
        teacher_topk=cfg.train.teacher_topk, teacher=cfg.model.name_or_path,
        load_teacher=lambda: _load_teacher(
            cfg, f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else None),
        topk_batch_size=cfg.train.micro_batch_size, format=cfg.data.format, packing=cfg.data.packing,
    )
    strategy = make_strategy(cfg.distributed, cfg.train, devices * num_nodes)  # refuses bad settings before loading
    on_deepspeed = "deepspeed" in type(strategy).__name__.lower()
    # QLoRA: every tensor keeps its dtype (the adapters lora.dtype, the base the model's)
    precision = "32-true" if qlora_mode else lightning_precision(cfg.train.master_weights, cfg.train.autocast,
                                                                 deepspeed=on_deepspeed)
    if qlora_mode:
        student, teacher, base_print, folder = qlora.build(cfg, lambda: _load_teacher(cfg), enable_checkpointing)
        trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
        report = f"qlora: {trainable} adapter parameters on the packed base of {folder.name} ({folder.kind.value})"
    else:
        student, teacher, report = build_models(cfg, prepare_start(cfg))
        base_print = None
        report = f"{report}\n{model_summary(student, teacher)}"
    module = QATModule(student, teacher, cfg.train, seed=cfg.seed, base_fingerprint=base_print)
    ckpt_dir = out_dir / "checkpoints"
    prepare_output(out_dir)
    if rank_world()[0] == 0:
        prune_checkpoints(ckpt_dir, cfg.train.keep_last)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="step={step}", auto_insert_metric_name=False,
                                 every_n_train_steps=cfg.train.save_every, save_top_k=cfg.train.keep_last,
                                 monitor="step", mode="max", save_last=False)
    trainer = L.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=devices, num_nodes=num_nodes, strategy=strategy,
        precision=precision,
        max_steps=cfg.train.max_steps, accumulate_grad_batches=cfg.train.grad_accum,
        gradient_clip_val=None if on_deepspeed else cfg.train.grad_clip,
        logger=_loggers(out_dir, cfg.train.save_every),
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step"), QuantStats(cfg.train.stats_every), CtrlC(),
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
        print(report, file=sys.stderr)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=find_resume(ckpt_dir, cfg.train.resume), weights_only=True)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns ctrl-C into exit(1) after its shutdown: report it as ours
            raise KeyboardInterrupt from None
        raise
    # Collective under DeepSpeed; the full state (optimizer, loops), so that a later run can resume from it.
    trainer.save_checkpoint(ckpt_dir / f"step={trainer.global_step}.ckpt", weights_only=False)
    if trainer.global_rank == 0:
        prune_checkpoints(ckpt_dir, cfg.train.keep_last)
    if qlora_mode:
        final = qlora.finish(cfg, student, tok, out_dir, dm, folder, base_print) if trainer.global_rank == 0 else None
    else:
        final = consolidate(student, tok, out_dir / "model", trainer.strategy)
    trainer.strategy.barrier()
    return final or out_dir / "model"

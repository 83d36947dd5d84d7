"""The models a run trains: the student in its master weights' dtype and the frozen teacher, and the trained student
written as one folder (QAT; QLoRA builds on the same teacher and checkpointing, see trainer/qlora.py)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional, Union

import torch
from lightning.pytorch.strategies import Strategy

from qat.apply import QuantReport, quantize_model
from qat.fast import enable as enable_speedups
from qat.io.atomic import atomic_dir
from qat.io.env import rank_world
from qat.io.models import load_model
from qat.linear import QuantLinear

from .config import RunConfig
from .init import load_student
from .optim import resolve_master_weights


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
    if cfg.train.router_kd and cfg.train.teacher_topk:
        raise ValueError("train.router_kd compares the teacher's routing with the student's on every batch, and "
                         "train.teacher_topk caches the teacher's logits only: set one of them to 0")
    teacher = None if cfg.train.teacher_topk else load_teacher(cfg)
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


def load_teacher(cfg: RunConfig, device: Optional[str] = None) -> torch.nn.Module:
    """The frozen teacher (model.name_or_path) in eval mode, moved to `device` when one is given."""
    # bf16 on GPUs (memory); fp32 on CPU, where it is also the faster dtype. ("auto")
    teacher = load_model(cfg.model.name_or_path, "auto", cfg.model.attn_implementation,
                         cfg.model.trust_remote_code)
    return teacher.eval().to(device) if device else teacher.eval()


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
        state = {k: v.detach() for k, v in student.state_dict().items()}
        with atomic_dir(out, need=sum(v.numel() * v.element_size() for v in state.values())) as tmp:
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

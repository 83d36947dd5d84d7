"""The QAT LightningModule: a fake-quantized student distilled from its frozen full-precision teacher."""

from __future__ import annotations

import sys
import time
from typing import Optional

import lightning as L
import torch
from torch import nn

from data.packing import model_inputs
from qat.coverage import routers
from qat.keys import ADAPTER_LAYOUT_KEY, FINGERPRINT_KEY
from qat.qlora.adapter_fit import adapter_layout, layout_change

from .config import TrainConfig
from .losses import CHUNKED_CE, kd_loss, kd_loss_topk, next_token_ce, router_kd_loss
from .optim import AdamWBF16, param_groups, resolve_master_weights, warmup_cosine


class NonFiniteError(ValueError):
    """Training produced a non-finite loss or gradient; the message names the step and where it started."""


class RouterLogits:
    """Forward hooks on a model's MoE routers that keep the router logits of the last forward, layer by layer."""

    def __init__(self, model: nn.Module) -> None:
        self.logits: list[torch.Tensor] = []
        names = sorted(routers(model), key=_layer_order)
        for name in names:
            if name.endswith("shared_expert_gate"):
                continue  # a shared expert's sigmoid gate, not a distribution over experts
            model.get_submodule(name).register_forward_hook(self._keep)
        if not names:
            raise ValueError("train.router_kd > 0 needs an MoE model (one whose layers route tokens to experts); "
                             "this one has no router: set train.router_kd=0")

    def _keep(self, module: nn.Module, args, output) -> None:
        self.logits.append(output[0] if isinstance(output, tuple) else output)

    def clear(self) -> None:
        self.logits = []


def _layer_order(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


class QATModule(L.LightningModule):
    """LLM-QAT: loss = T^2 KL(teacher || student) over all positions (+ ce_weight * next-token CE); without a
    teacher, next-token CE. QLoRA trains the same way with a peft model as the student.

    The teacher stays in eval mode with requires_grad off; it is a submodule so that DeepSpeed
    ZeRO-3 partitions it like the student instead of replicating it on every rank. Instruction batches carry
    an `assistant_mask`: the losses then count the predictions of assistant tokens only.
    With `base_fingerprint` (QLoRA) a checkpoint holds the trainable parameters and that fingerprint, not
    the frozen base, and a resume onto another base is refused.
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], train_cfg: TrainConfig, seed: int = 0,
                 base_fingerprint: Optional[str] = None) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.cfg = train_cfg
        self.seed = seed
        self.base_fingerprint = base_fingerprint
        self._t_last: Optional[float] = None
        self._skipped = 0  # non-finite batches skipped so far (train.skip_nonfinite)
        # Checkpoints hold the student only; the teacher is rebuilt from its folder.
        self.strict_loading = False
        self._routers: Optional[tuple[RouterLogits, RouterLogits]] = None
        if train_cfg.router_kd > 0 and teacher is not None:
            self._routers = (RouterLogits(student), RouterLogits(teacher))

    def train(self, mode: bool = True) -> QATModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # no dropout, frozen statistics, whatever Lightning toggles
        return self

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if self._routers is not None:
            for r in self._routers:
                r.clear()
        inputs = model_inputs(batch)  # packed examples: their positions, attention kept inside each example
        # QLoRA without a teacher: the cross-entropy from hidden states, no vocabulary-wide logits (trainer/qlora.py)
        chunked = getattr(self.student, CHUNKED_CE, None)
        if chunked is not None and self.teacher is None and "teacher_topk_values" not in batch and not self._routers:
            ce = chunked(inputs, batch.get("assistant_mask", mask))
            return {"ce": ce, "loss": ce}
        student = self.student(**inputs).logits
        # Which tokens are targets (next_token_ce reads mask[:, 1:]) and which positions predict one (KD).
        ce_mask, kd_mask = mask, mask
        if "assistant_mask" in batch:
            ce_mask = batch["assistant_mask"]
            kd_mask = torch.nn.functional.pad(ce_mask[:, 1:], (0, 1))
        out: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=student.device)
        cached = "teacher_topk_values" in batch
        if cached:  # the teacher's logits were computed once, before training (data.teacher_cache)
            out["kd"] = kd_loss_topk(student, batch["teacher_topk_values"], batch["teacher_topk_indices"], kd_mask,
                                     self.cfg.kd_temperature)
            loss = loss + out["kd"]
        elif self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(**inputs).logits
            out["kd"] = kd_loss(student, teacher, kd_mask, self.cfg.kd_temperature)
            loss = loss + out["kd"]
        if self._routers is not None:
            s_routes, t_routes = (r.logits for r in self._routers)
            out["router_kd"] = router_kd_loss(s_routes, t_routes, mask)
            loss = loss + self.cfg.router_kd * out["router_kd"]
        has_teacher = cached or self.teacher is not None
        if self.cfg.ce_weight > 0 or not has_teacher:
            out["ce"] = next_token_ce(student, ids, ce_mask)
            loss = loss + (self.cfg.ce_weight if has_teacher else 1.0) * out["ce"]
        out["loss"] = loss
        return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> Optional[torch.Tensor]:
        out = self.losses(batch)
        if self._any_rank(not bool(torch.isfinite(out["loss"].detach())), out["loss"].device):
            self._nonfinite(batch, "loss")
            return None  # skipped: no backward, no optimizer step
        now = time.perf_counter()
        tokens = batch["input_ids"].numel() * max(1, self.trainer.world_size)
        log = {f"train/{k}": v.detach() for k, v in out.items()}
        if self._t_last is not None:
            log["train/tokens_per_s"] = torch.tensor(tokens / max(now - self._t_last, 1e-9))
        self._t_last = now
        log["train/lr"] = torch.tensor(self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log_dict(log, prog_bar=False, on_step=True, sync_dist=False)
        self.log("kd", out.get("kd", out["loss"]).detach(), prog_bar=True, on_step=True, logger=False)
        return out["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        # Under ZeRO the gradients live partitioned in DeepSpeed's optimizer: nothing to read here.
        named = [(n, p.grad) for n, p in self.student.named_parameters() if p.grad is not None]
        if named:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for _, g in named]))
            if not bool(torch.isfinite(norm)):  # gradients are all-reduced already: every rank sees the same
                first = next(n for n, g in named if not bool(torch.isfinite(g).all()))
                self._nonfinite(None, f"gradient of {first}")
                for p in self.student.parameters():
                    p.grad = None  # skipped: the optimizer leaves parameters without a gradient alone
                return
            self.log("train/grad_norm", norm, on_step=True, prog_bar=False)

    def _any_rank(self, flag: bool, device: torch.device) -> bool:
        """`flag` on any rank: every rank must take the same path, or the next collective would hang."""
        if self.trainer.world_size > 1:
            return bool(self.trainer.strategy.reduce(torch.tensor(float(flag), device=device), reduce_op="max"))
        return flag

    def _nonfinite(self, batch: Optional[dict[str, torch.Tensor]], what: str) -> None:
        """Skip this batch while train.skip_nonfinite allows, else stop naming the step and where it began."""
        step = self.trainer.global_step
        if self._skipped < self.cfg.skip_nonfinite:
            self._skipped += 1
            if self.trainer.global_rank == 0:
                print(f"distqat train: warning: step {step}: the {what} is not finite; batch skipped "
                      f"({self._skipped} of train.skip_nonfinite={self.cfg.skip_nonfinite})", file=sys.stderr)
            return
        where = self.first_nonfinite(batch) if batch is not None else "see the gradient named"
        raise NonFiniteError(
            f"step {step}: the {what} is not finite; the first module whose output is not: {where}. The run "
            "stopped without writing model/ (its last checkpoint is the last good state); fix the weights or "
            "the data, or set train.skip_nonfinite=N to skip up to N such batches")

    @torch.no_grad()
    def first_nonfinite(self, batch: dict[str, torch.Tensor]) -> str:
        """The first module (student, then teacher, in the order their outputs are produced) whose output holds
        a NaN or an infinity on `batch`."""
        found: list[str] = []

        def watch(name: str):
            def hook(module: nn.Module, args, output) -> None:
                t = output[0] if isinstance(output, (tuple, list)) else output
                if not found and isinstance(t, torch.Tensor) and t.is_floating_point() and \
                        not bool(torch.isfinite(t).all()):
                    found.append(name)
            return hook

        models = [("student", self.student)] + ([("teacher", self.teacher)] if self.teacher is not None else [])
        handles = [m.register_forward_hook(watch(f"{who} {n}")) for who, model in models
                   for n, m in model.named_modules() if n]
        try:
            self.losses(batch)
        finally:
            for h in handles:
                h.remove()
        return found[0] if found else "none (the loss itself, e.g. an empty mask)"

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        cfg = self.cfg
        groups = param_groups(self.student, cfg.peak_lr, cfg.weight_decay, cfg.quantizer_lr, cfg.fp_lr,
                              cfg.lr_relative)
        if resolve_master_weights(cfg.master_weights) == "bf16":
            opt = AdamWBF16(groups, lr=cfg.peak_lr, compensation=cfg.compensation, seed=self.seed)
        else:
            opt = torch.optim.AdamW(groups, lr=cfg.peak_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict")
        if state is not None:
            for k in [k for k in state if k.startswith("teacher.")]:
                del state[k]
        if self.base_fingerprint is not None:
            checkpoint[FINGERPRINT_KEY] = self.base_fingerprint
            checkpoint[ADAPTER_LAYOUT_KEY] = adapter_layout(self.student)
            if state is not None:
                trainable = {f"student.{n}" for n, p in self.student.named_parameters() if p.requires_grad}
                for k in [k for k in state if k not in trainable]:
                    del state[k]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        found = checkpoint.get(FINGERPRINT_KEY)
        if self.base_fingerprint is not None and found != self.base_fingerprint:
            raise ValueError("the checkpoint to resume from was trained on another base (its fingerprint differs); "
                             "resume with the same model.name_or_path and quant settings, or set train.resume=never")
        # The checkpoint loads non-strictly (it holds no teacher): other adapters would start fresh without a word.
        change = layout_change(checkpoint.get(ADAPTER_LAYOUT_KEY), adapter_layout(self.student)) \
            if self.base_fingerprint is not None else None
        if change is not None:
            raise ValueError(f"the checkpoint to resume from holds other adapters: {change}; resume with its lora "
                             "settings, or set train.resume=never (or another output_dir) to train fresh adapters")

"""The QAT LightningModule: a fake-quantized student distilled from its frozen full-precision teacher."""

from __future__ import annotations

import time
from typing import Optional

import lightning as L
import torch
from torch import nn

from .config import TrainConfig
from .losses import kd_loss, kd_loss_topk, next_token_ce
from .optim import AdamWBF16, param_groups, warmup_cosine

FINGERPRINT = "distqat_base_fingerprint"  # in a QLoRA checkpoint: the base its adapters belong to


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
        # Checkpoints hold the student only; the teacher is rebuilt from its folder.
        self.strict_loading = False

    def train(self, mode: bool = True) -> QATModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # no dropout, frozen statistics, whatever Lightning toggles
        return self

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        student = self.student(input_ids=ids, attention_mask=mask).logits
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
                teacher = self.teacher(input_ids=ids, attention_mask=mask).logits
            out["kd"] = kd_loss(student, teacher, kd_mask, self.cfg.kd_temperature)
            loss = loss + out["kd"]
        has_teacher = cached or self.teacher is not None
        if self.cfg.ce_weight > 0 or not has_teacher:
            out["ce"] = next_token_ce(student, ids, ce_mask)
            loss = loss + (self.cfg.ce_weight if has_teacher else 1.0) * out["ce"]
        out["loss"] = loss
        return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
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
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm, on_step=True, prog_bar=False)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        cfg = self.cfg
        groups = param_groups(self.student, cfg.lr, cfg.weight_decay, cfg.quantizer_lr)
        if cfg.master_weights == "bf16":
            opt = AdamWBF16(groups, lr=cfg.lr, compensation=cfg.compensation, seed=self.seed)
        else:
            opt = torch.optim.AdamW(groups, lr=cfg.lr)
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
            checkpoint[FINGERPRINT] = self.base_fingerprint
            if state is not None:
                trainable = {f"student.{n}" for n, p in self.student.named_parameters() if p.requires_grad}
                for k in [k for k in state if k not in trainable]:
                    del state[k]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        found = checkpoint.get(FINGERPRINT)
        if self.base_fingerprint is not None and found != self.base_fingerprint:
            raise ValueError("the checkpoint to resume from was trained on another base (its fingerprint differs); "
                             "resume with the same model.name_or_path and quant settings, or set train.resume=never")

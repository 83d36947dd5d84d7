"""`distqat train train.mode=qlora`: adapters on a packed base, then the adapters, the held-out loss and the
merge `lora.merge` asks for, written beside the run's checkpoints."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader
from transformers.modeling_layers import GradientCheckpointingLayer

from data.blocks import BlockData
from data.instructions import BUNDLED_INSTRUCTIONS
from data.packing import model_inputs
from qat.export.convert import convert_model
from qat.io.atomic import atomic_dir, write_json
from qat.io.folders import Folder, Kind
from qat.qlora.adapters import add_adapters, save_adapters
from qat.qlora.base import build_base, fingerprint
from qat.qlora.config import CALIBRATED_REQUANT
from qat.qlora.merge import merge_bf16, merge_qalora, merge_requant
from qat.runtime.packed_experts import packed_experts

from .config import RunConfig
from .losses import CHUNKED_CE, chunked_next_token_ce, next_token_ce

HELD_OUT_BLOCKS = 64  # blocks scored before and after training (the held-out loss of the run)


def check(cfg: RunConfig) -> None:
    """One-line errors for settings QLoRA cannot train with, before anything loads."""
    lora = cfg.lora
    if cfg.train.teacher_topk and not lora.distill:
        raise ValueError("train.teacher_topk caches the teacher for distillation, which QLoRA does only with "
                         "lora.distill=true (it trains on the assistant tokens alone by default)")
    if lora.merge == "qalora" and lora.variant != "qalora":
        raise ValueError("lora.merge=qalora folds QA-LoRA adapters into the zero points: set lora.variant=qalora, "
                         "or lora.merge=requant or bf16")


def build(cfg: RunConfig, load_teacher: Callable[[], nn.Module],
          checkpointing: Callable[[nn.Module], None]) -> tuple[PeftModel, Optional[nn.Module], str, Folder]:
    """(the student: adapters on the packed base, the teacher or None, the base's fingerprint, its folder)."""
    check(cfg)
    m = cfg.model
    base, folder = build_base(m.name_or_path, cfg.quant, m.dtype, m.attn_implementation, m.trust_remote_code,
                              cfg.lora.double_quant)
    if cfg.lora.distill and folder.kind is not Kind.BASE:
        raise ValueError("lora.distill=true distils the full-precision model: model.name_or_path must be that "
                         f"model, not a {folder.kind.value} folder")
    if cfg.lora.merge == "qalora" and packed_experts(base):
        # convert writes packed linears only: an expert stack would land as a linear no reader can load
        raise ValueError("lora.merge=qalora writes an integer checkpoint, and convert does not write packed MoE "
                         "experts yet; use lora.merge=bf16 or requant (lora.variant=qalora trains as it is)")
    base_print = fingerprint(base)
    if cfg.train.gradient_checkpointing:
        checkpointing(base)
    base.config.use_cache = False
    student = add_adapters(base, cfg.lora)
    if cfg.train.gradient_checkpointing:
        student.enable_input_require_grads()  # the frozen embedding's output must carry grad into the checkpoints
        train_checkpointed_layers(student)
    if not cfg.lora.distill:
        # KD needs the student's logits; the plain (and instruction-masked) cross-entropy does not.
        setattr(student, CHUNKED_CE, ChunkedCE.of(student))
    teacher = load_teacher() if cfg.lora.distill and not cfg.train.teacher_topk else None
    return student, teacher, base_print, folder


def train_checkpointed_layers(model: nn.Module) -> int:
    """Put the layers that transformers checkpoints (its GradientCheckpointingLayer: a decoder layer) in train
    mode, alone: a layer recomputes its activations in backward only while `training` is set, and the rest of
    the base stays in eval (its dropouts off, as the packed base was built). Returns how many were set."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
              and isinstance(m, GradientCheckpointingLayer)]
    for m in layers:
        m.training = True  # not m.train(): that would switch the layer's attention and MLP dropouts on as well
    return len(layers)


class ChunkedCE:
    """The student's next-token cross-entropy from its decoder's last hidden state and its output head, scored a
    chunk of tokens at a time (trainer.losses.chunked_next_token_ce): the (tokens, vocab) fp32 logits, and the
    softmax autograd would keep of them, never exist. Only for a model whose logits are head(hidden) (softcapped
    where its config says so), which `of` checks on a few tokens."""

    def __init__(self, decoder: nn.Module, head: nn.Linear, softcap: Optional[float]) -> None:
        self.decoder, self.head, self.softcap = decoder, head, softcap

    @classmethod
    @torch.no_grad()
    def of(cls, model: nn.Module) -> Optional[ChunkedCE]:
        """The chunked loss of `model` (a peft model or a causal LM), or None where its logits are not
        head(hidden): the loss then goes through the model's logits as before."""
        inner = model.get_base_model() if isinstance(model, PeftModel) else model
        try:
            decoder, head = inner.get_decoder(), inner.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        if type(head) is not nn.Linear or decoder is None:  # a packed or adapted head computes otherwise
            return None
        config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
        loss = cls(decoder, head, getattr(config, "final_logit_softcapping", None))
        ids = torch.arange(8, device=head.weight.device)[None] % head.weight.shape[0]
        mode = [(m, m.training) for m in inner.modules()]
        inner.eval()
        seen: list[torch.Tensor] = []  # the decoder's output in the same forward: one pass over the base, not two
        hook = decoder.register_forward_hook(lambda module, args, out: seen.append(out.last_hidden_state))
        try:
            want = inner(input_ids=ids).logits.double()
        finally:
            hook.remove()
            for m, training in mode:
                m.training = training
        if len(seen) != 1:
            return None
        got = loss.logits(seen[0]).double()
        # a logit scale or another head would differ by far more than the matmul's rounding
        return loss if got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-3) else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.head(hidden)
        return out if self.softcap is None else torch.tanh(out / self.softcap) * self.softcap

    def __call__(self, inputs: dict[str, Optional[torch.Tensor]], loss_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """`inputs`: the model's keyword arguments (`data.packing.model_inputs`: packed blocks bring positions)."""
        hidden = self.decoder(**inputs).last_hidden_state
        return chunked_next_token_ce(hidden, self.head, inputs["input_ids"], loss_mask, self.softcap)


@torch.no_grad()
def held_out_loss(model: nn.Module, loader: DataLoader) -> float:
    """Mean next-token cross-entropy over the loss tokens (assistant tokens of instruction data) of up to
    HELD_OUT_BLOCKS blocks."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if i * loader.batch_size >= HELD_OUT_BLOCKS:
            break
        ids = batch["input_ids"].to(device)
        mask = batch.get("assistant_mask", batch["attention_mask"]).to(device)
        logits = model(**model_inputs({k: v.to(device) for k, v in batch.items()})).logits
        n = int(mask[:, 1:].sum())
        total += float(next_token_ce(logits, ids, mask)) * n
        count += n
    return total / max(count, 1)


def held_out(cfg: RunConfig, dm: BlockData, tokenizer) -> Optional[DataLoader]:
    """The bundled instruction set's test split (other articles), else the run's own validation blocks."""
    if cfg.data.path == BUNDLED_INSTRUCTIONS:
        test = BlockData(path=cfg.data.path, split="test", seq_len=cfg.data.seq_len, format=cfg.data.format,
                         packing=cfg.data.packing, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.seed,
                         tokenizer=tokenizer, val_fraction=0.0)
        test.setup()
        return test.dataloader(0, 1)
    if dm.val_blocks is None or not len(dm.val_blocks):
        return None
    return BlockData.val_dataloader(dm, 0, 1)


def finish(cfg: RunConfig, student: PeftModel, tokenizer, out_dir: Path, dm: BlockData, folder: Folder,
           base_print: str) -> Path:
    """On rank 0 after training: the adapters, the held-out loss of the base and the trained adapters, and the
    merged model of `lora.merge`. Returns the merged folder, or the adapters' without a merge."""
    student.eval()
    adapters = save_adapters(student, out_dir / "adapters", {
        "base": folder.name, "base_kind": folder.kind.value, "fingerprint": base_print,
        "spec": cfg.quant.to_dict() if folder.kind is Kind.BASE else (folder.spec.to_dict() if folder.spec else None),
        "variant": cfg.lora.variant, "double_quant": cfg.lora.double_quant}, tokenizer)
    test = held_out(cfg, dm, tokenizer)
    losses: dict[str, float] = {}
    if test is not None:
        with student.disable_adapter():
            losses["base"] = held_out_loss(student, test)
        losses["trained"] = held_out_loss(student, test)
    merge, model_dir = cfg.lora.merge, out_dir / "model"
    if merge != "none":
        student.cpu()
        merged = _merge(cfg, student, dm, folder, out_dir)
        if test is not None:
            losses[f"merged ({merge})"] = held_out_loss(merged, test)
        if merge == "qalora":  # an integer checkpoint (format version 4), tokenizer files copied from the base
            # replace: a rerun of a finished (or killed after this) run writes its own model/ again
            convert_model(merged, model_dir, source=folder.path, replace=True)
        else:
            need = sum(t.numel() * t.element_size() for t in merged.state_dict().values())
            with atomic_dir(model_dir, need=need) as tmp:
                merged.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    merged_loss = losses.get(f"merged ({merge})")
    if merged_loss is not None and losses["trained"] < losses["base"]:
        kept = (losses["base"] - merged_loss) / (losses["base"] - losses["trained"])
        if kept < 0.5:
            print(f"qlora: warning: the {merge} merge kept {100 * kept:.0f}% of what the adapters gained on "
                  "held-out text (rounding onto a low-bit grid erases small adapters); lora.variant=qalora "
                  "with lora.merge=qalora folds the adapters exactly", file=sys.stderr)
    if losses:
        where = "test split" if cfg.data.path == BUNDLED_INSTRUCTIONS else "validation blocks"
        write_json(out_dir / "qlora_eval.json", {"held_out_loss": losses, "held_out": where,
                                                 "blocks": HELD_OUT_BLOCKS})
        print("qlora: held-out loss " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()), file=sys.stderr)
    return adapters if merge == "none" else model_dir


def _merge(cfg: RunConfig, student: PeftModel, dm: BlockData, folder: Folder, out_dir: Path) -> nn.Module:
    if cfg.lora.merge == "qalora":
        return merge_qalora(student)
    if cfg.lora.merge == "bf16":
        return merge_bf16(student)
    n = min(cfg.ptq.n_samples, len(dm.train_blocks))
    calib = dm.train_blocks[:n].long() if cfg.lora.requant in CALIBRATED_REQUANT else None
    model, report = merge_requant(student, cfg.lora.requant, calib, replace(cfg.ptq.gptq, damp=cfg.lora.requant_damp))
    write_json(out_dir / "merge_report.json", {"merge": f"requant-{cfg.lora.requant}", "layers": report})
    return model

"""Run by bench/peers.py inside torchao's virtualenv (not distqat's): torchao's 8da4w QAT
(Int8DynActInt4WeightQATQuantizer: int4 symmetric group weights, int8 per-token asymmetric activations) on the
decoder's linears of an HF folder (lm_head stays FP, as in distqat's specs), distilled from the FP model on the token
blocks the bench wrote, with distqat's optimizer settings (AdamW, warm-up then cosine to min_lr_ratio, grad clip,
all parameters at lr, KL at T=1 over every position). Writes the start (torchao's RTN) and the trained state with
each QAT linear's weight replaced by its fake-quantized value, for distqat's scorer (which adds the int8 per-token
activations); stdout's last line is a JSON record (times, losses, its own start perplexity, versions)."""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
import torchao
import transformers
from safetensors.torch import load_file, save_file
from torchao.quantization.qat import Int8DynActInt4WeightQATQuantizer


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    # the same schedule as distqat's trainer.optim.warmup_cosine (copied: this env has no distqat)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, with a QAT linear's weight fake-quantized (what its forward multiplies by)."""
    fq = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if hasattr(m, "weight_fake_quantizer"):
                fq[name + ".weight"] = m.weight_fake_quantizer(m.weight).float()
        return {k: fq.get(k, p.detach().float()).contiguous() for k, p in model.named_parameters()}


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for w in windows:
        logits = model(w[None]).logits.float()
        nll += float(F.cross_entropy(logits[0, :-1], w[1:], reduction="sum"))
        n += len(w) - 1
    return math.exp(nll / n)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="HF folder")
    p.add_argument("--train", required=True, help="safetensors with 'ids' (steps x batch, seq_len), in order")
    p.add_argument("--windows", help="safetensors with 'ids' (n, len): score the start on them (a cross-check)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--start-out", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.manual_seed(0)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    student = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    teacher.requires_grad_(False)
    Int8DynActInt4WeightQATQuantizer(groupsize=a.group).prepare(student.model)  # the decoder: not lm_head
    n_qat = sum(hasattr(m, "weight_fake_quantizer") for m in student.modules())
    save_file(state(student), a.start_out)
    record: dict = {"qat_linears": n_qat}
    if a.windows:
        student.eval()
        record["start_ppl_own"] = perplexity(student, load_file(a.windows)["ids"].long())
    ids = load_file(a.train)["ids"].long()
    if ids.shape[0] < a.steps * a.batch:
        raise SystemExit(f"{ids.shape[0]} blocks for {a.steps} steps of {a.batch}")
    params = [q for q in student.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, a.warmup, a.steps, a.min_lr_ratio))
    student.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(a.steps):
        batch = ids[step * a.batch:(step + 1) * a.batch]
        with torch.no_grad():
            log_p_t = F.log_softmax(teacher(batch).logits.float(), dim=-1)
        log_p_s = F.log_softmax(student(batch).logits.float(), dim=-1)
        loss = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
        loss.backward()
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        print(f"step {step + 1}/{a.steps} loss {losses[-1]:.4f}", flush=True)
    record["train_seconds"] = time.perf_counter() - t0
    save_file(state(student), a.out)
    record.update(losses=losses, threads=torch.get_num_threads(), quantizer="Int8DynActInt4WeightQATQuantizer",
                  versions={"torchao": torchao.__version__, "torch": torch.__version__,
                            "transformers": transformers.__version__})
    print(json.dumps(record))


if __name__ == "__main__":
    main()

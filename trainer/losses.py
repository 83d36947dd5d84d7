"""Distillation losses (LLM-QAT): KL from the teacher's next-token distribution to the student's."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over unmasked positions of KL(p_teacher || p_student) at temperature T, times T^2.

    The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return _masked_mean((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1), mask) * t * t


def kd_loss_topk(
    student_logits: torch.Tensor, topk_values: torch.Tensor, topk_indices: torch.Tensor,
    mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
) -> torch.Tensor:
    """kd_loss against a cached teacher: its top-k logits (renormalised over those k) per position.

    KL(p_T || p_S) = sum_k p_T,k (log p_T,k - log p_S[idx_k]) with the student's full softmax, so with
    k = vocabulary size this is kd_loss exactly; smaller k ignores the teacher's tail mass.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, topk_indices.long())
    log_p_t = F.log_softmax(topk_values.float() / t, dim=-1)
    return _masked_mean((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1), mask) * t * t


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy of predicting token i+1 at position i, padding excluded."""
    target = input_ids[:, 1:]
    wide = logits if logits.dtype == torch.float64 else logits.float()  # fp64 stays: the float64 references
    loss = F.cross_entropy(wide[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                           reduction="none").view_as(target)
    if mask is None:
        return loss.mean()
    m = mask[:, 1:].to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp_min(1)


def router_kd_loss(student_logits: list[torch.Tensor], teacher_logits: list[torch.Tensor],
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over MoE layers of the mean over unmasked tokens of KL(router softmax of teacher || of student).

    Each layer's router logits are (tokens, experts), tokens flattened from (batch, seq) in order."""
    flat = None if mask is None else mask.reshape(-1)
    terms = [kd_loss(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), flat)
             for s, t in zip(student_logits, teacher_logits)]
    return torch.stack(terms).mean()


CE_CHUNK_ELEMENTS = 1 << 22  # logits per chunk of the chunked cross-entropy: 16 MB in fp32
# ...but never fewer rows than this: a chunk's two matmuls read the whole head, and at a large vocabulary 16 MB is
# a few rows (32 at 128k), where reading it dominates. At the 1B shape (2048 x 128,256 head, one thread) the loss
# of 255 tokens took 5.65 s at 32 rows a chunk, 4.51 s at 128, 4.87 s unchunked.
CE_MIN_ROWS = 128
CHUNKED_CE = "chunked_ce"  # a student's attribute holding its chunked loss (trainer/qlora.py; QATModule reads it)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(h_i W^T + b), t_i), the (n, vocab) logits computed a chunk of rows at a time and the
    gradient of h (and W, b where they train) computed in forward beside the loss, so backward is a scaling."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                chunk: int, softcap: Optional[float]) -> torch.Tensor:  # type: ignore[override]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float64 if h.dtype == torch.float64 else torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=total.dtype) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=total.dtype) if need_b else None
        for start in range(0, len(h), chunk):
            h_c, t_c = h[start:start + chunk], target[start:start + chunk]
            # As the model's head computes them (its dtype), then widened: the same logits as the unchunked loss.
            logits = F.linear(h_c, weight, bias).to(total.dtype)
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            lse = torch.logsumexp(logits, -1)
            total += (lse - logits.gather(-1, t_c[:, None]).squeeze(-1)).sum()
            if not (need_h or need_w or need_b):
                continue
            g = (logits - lse[:, None]).exp_()  # d CE / d logits: softmax less the one-hot target
            g[torch.arange(len(t_c), device=g.device), t_c] -= 1
            if softcap is not None:
                g *= 1 - (logits / softcap) ** 2  # d (c tanh(z / c)) / dz, tanh read back from the logits
            g = g.to(h.dtype)
            if need_h:
                grad_h[start:start + chunk] = g @ weight.to(h.dtype)
            if need_w:
                grad_w += (g.t() @ h_c).to(grad_w.dtype)
            if need_b:
                grad_b += g.sum(0).to(grad_b.dtype)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.have = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        saved = iter(ctx.saved_tensors)
        out = [next(saved) if have else None for have in ctx.have]
        if out[0] is not None:
            out[0] = out[0] * grad.to(out[0].dtype)
        if out[1] is not None:
            out[1] = (out[1] * grad).to(ctx.dtypes[0])
        if out[2] is not None:
            out[2] = (out[2] * grad).to(ctx.dtypes[1])
        return out[0], out[1], out[2], None, None, None


def chunked_next_token_ce(hidden: torch.Tensor, head: torch.nn.Linear, input_ids: torch.Tensor,
                          mask: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                          chunk: Optional[int] = None) -> torch.Tensor:
    """next_token_ce of the logits head(hidden) (softcapped where the model softcaps them), without the
    (tokens, vocab) logits: only the positions whose target counts are scored, `chunk` rows at a time (default:
    CE_CHUNK_ELEMENTS logits per chunk, at least CE_MIN_ROWS rows). What backward keeps is one hidden-sized
    gradient of the scored rows."""
    target = input_ids[:, 1:]
    h = hidden[:, :-1]
    if mask is not None:
        keep = mask[:, 1:].bool()
        h, target = h[keep], target[keep]
    else:
        h, target = h.reshape(-1, h.shape[-1]), target.reshape(-1)
    chunk = chunk or max(CE_MIN_ROWS, CE_CHUNK_ELEMENTS // head.weight.shape[0])
    total = _LinearCrossEntropy.apply(h, head.weight, head.bias, target, chunk, softcap)
    return total / max(len(target), 1)

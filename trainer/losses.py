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
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
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

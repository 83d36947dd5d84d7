"""AQLM (Egiazarian et al. 2024): additive quantization of each linear against its calibration inputs.

A weight (out, in) is cut into groups of `in_group_size` (8) input columns; each group of each output row is
coded as the sum of one codeword from each of M codebooks of 2^B vectors of that size, times a scale per
output channel: W_hat[r, group j] = s_r * sum_m C_m[codes[r, j, m]]. With H = X^T X / n of the layer's input,
the objective is the output error tr((W - W_hat) H (W - W_hat)^T). Codebooks start from residual k-means on
the row-scaled groups; then `iterations` times: (a) codes by beam search, one codebook at a time with the
others fixed, visiting a row's groups in order with `beam_size` hypotheses (H couples the groups of a row;
the rows are independent); (b) codebooks by Adam on the objective with the codes fixed (kept only when it
lowers it), then each row's scale by its closed-form least squares. Every step keeps or lowers the
objective, so it falls monotonically across iterations (`AQLMResult.history`).

The layer becomes an `AQLMLinear` (`qat.runtime.aqlm`): the layout transformers' AQLM integration loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..io.models import ModelError
from ..keys import AQLM_KEY, HF_QUANT_KEY
from ..linear import QuantLinear
from ..runtime.aqlm import AQLMLinear, bits_per_weight
from ..spec import QuantSpec, TensorSpec
from .aqlm_folder import aqlm_config, finish_model
from .config import AQLMConfig
from .parts import Rounded, Rounding


@dataclass
class AQLMResult:
    codes: torch.Tensor  # (out, in // g, M) int64 in [0, 2^B)
    codebooks: torch.Tensor  # (M, 2^B, g)
    scales: torch.Tensor  # (out,)
    history: list[float]  # the objective after initialisation and after each iteration

    def weight(self) -> torch.Tensor:
        return self.scales[:, None] * reconstruct(self.codes, self.codebooks)


def reconstruct(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """sum_m C_m[codes[..., m]] laid out as (out, in), unscaled."""
    out, groups, m_books = codes.shape
    v = sum(codebooks[m][codes[..., m]] for m in range(m_books))
    return v.reshape(out, groups * codebooks.shape[-1])


def objective(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    d = w - w_hat
    return float(((d @ h) * d).sum())


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator, chunk: int = 1 << 24):
    """Lloyd's k-means of the rows of x (n, g): (centres (k, g), assignment (n,)). An empty cluster keeps its centre."""
    n = x.shape[0]
    idx = torch.randperm(n, generator=gen)[:k] if n >= k else torch.randint(n, (k,), generator=gen)
    c = x[idx.to(x.device)].clone()
    if n < k:  # more codewords than vectors: spread the duplicates a little
        c += 1e-3 * x.std() * torch.randn(c.shape, generator=gen, dtype=c.dtype).to(c.device)

    def assign(c):
        rows = max(1, chunk // k)
        cn = (c * c).sum(-1)
        return torch.cat([((-2 * x[i:i + rows] @ c.T) + cn).argmin(-1) for i in range(0, n, rows)])

    a = assign(c)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=k).to(x.dtype)
        c = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None], c)
        a = assign(c)
    return c, a


def initialise(w: torch.Tensor, cfg: AQLMConfig, gen: torch.Generator):
    """Row scales (rms of the row) and residual k-means codebooks on the scaled groups: (codes, codebooks, scales)."""
    out, n_in = w.shape
    g, m_books, k = cfg.in_group_size, cfg.num_codebooks, 1 << cfg.nbits_per_codebook
    scales = w.pow(2).mean(-1).sqrt().clamp_min(1e-12)
    resid = (w / scales[:, None]).reshape(-1, g)
    books, codes = [], []
    for _ in range(m_books):
        c, a = kmeans(resid, k, cfg.kmeans_iters, gen)
        resid = resid - c[a]
        books.append(c)
        codes.append(a)
    return torch.stack(codes, -1).reshape(out, n_in // g, m_books), torch.stack(books), scales


@torch.no_grad()
def beam_search(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                scales: torch.Tensor, m: int, beam: int, chunk: int = 1 << 24) -> torch.Tensor:
    """Codebook m's codes re-chosen by beam search over each row's groups in order, the other codebooks fixed.

    A hypothesis is a row's full code assignment with H E (E = W - W_hat, the residual) and its loss; changing group j's
    code by delta = s (C[k] - C[cur]) turns the loss L into L - 2 delta.(H E)_j + delta^T H_jj delta, scored for
    all codewords at once. A row keeps its best hypothesis, never worse than its current codes."""
    out = w.shape[0]
    k, g = codebooks.shape[1:]
    rows = max(1, chunk // (beam * k))
    new = codes.clone()
    for r0 in range(0, out, rows):
        r1 = min(out, r0 + rows)
        new[r0:r1, :, m] = _beam_rows(w[r0:r1], h, codes[r0:r1], codebooks, scales[r0:r1], m, beam)
    return new


def _beam_rows(w, h, codes, codebooks, scales, m, beam):
    out, groups, _ = codes.shape
    k, g = codebooks.shape[1:]
    c = codebooks[m]
    e = w - scales[:, None] * reconstruct(codes, codebooks)  # (out, in); a hypothesis needs only its H E and loss
    he = (e @ h)[:, None]  # (out, b, in)
    loss = (he[:, 0] * e).sum(-1, keepdim=True)  # (out, b)
    hc = codes[:, None, :, m].clone()  # (out, b, groups)
    s = scales[:, None, None]
    ar = torch.arange(out, device=w.device)[:, None]
    for j in range(groups):
        sl = slice(j * g, (j + 1) * g)
        hjj = h[sl, sl]
        cur = c[hc[..., j]]  # (out, b, g)
        chc = ((c @ hjj) * c).sum(-1)  # (k,)
        # delta = s (C - cur): loss - 2 delta.HE_j + delta^T Hjj delta, expanded so no (out, b, k, g) tensor exists.
        lin = he[..., sl] @ c.T - (he[..., sl] * cur).sum(-1, keepdim=True)
        curh = cur @ hjj
        quad = chc - 2 * (curh @ c.T) + (curh * cur).sum(-1, keepdim=True)
        cand = loss[..., None] - 2 * s * lin + s * s * quad  # (out, b, k)
        top = cand.reshape(out, -1).topk(min(beam, cand.shape[1] * k), dim=-1, largest=False)
        bi, ki = top.indices // k, top.indices % k
        he, hc, cur = he[ar, bi], hc[ar, bi], cur[ar, bi]
        he -= (s * (c[ki] - cur)) @ h[sl, :]  # E loses delta at group j
        hc[..., j] = ki
        loss = top.values
    return hc[torch.arange(out, device=w.device), loss.argmin(-1)]


def update_codebooks(w, h, codes, codebooks, scales, steps: int, lr: float):
    """Adam on the codebooks (codes and scales fixed); the result only where it lowers the objective."""
    if steps <= 0:
        return codebooks
    before = objective(w, scales[:, None] * reconstruct(codes, codebooks), h)
    norm = max(float(((w @ h) * w).sum()), 1e-30)
    cb = codebooks.clone().requires_grad_(True)
    opt = torch.optim.Adam([cb], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            d = w - scales[:, None] * reconstruct(codes, cb)
            loss = ((d @ h) * d).sum() / norm
            opt.zero_grad()
            loss.backward()
            opt.step()
    cb = cb.detach()
    return cb if objective(w, scales[:, None] * reconstruct(codes, cb), h) < before else codebooks


def update_scales(w, h, codes, codebooks, scales):
    """Each row's scale by least squares: s_r = (W_r H U_r^T) / (U_r H U_r^T), U the unscaled reconstruction."""
    u = reconstruct(codes, codebooks)
    uh = u @ h
    den = (uh * u).sum(-1)
    num = (uh * w).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), scales)


@torch.no_grad()
def aqlm(w: torch.Tensor, h: torch.Tensor, cfg: AQLMConfig) -> AQLMResult:
    """AQLM of one weight (out, in) against H (in, in); float64 in, float64 out, else float32."""
    g = cfg.in_group_size
    if w.shape[1] % g:
        raise ValueError(f"aqlm: in_features={w.shape[1]} is not a multiple of ptq.aqlm.in_group_size={g}")
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    w = w.detach().to(dt)
    h = h.detach().to(dt).clone()
    h.diagonal().add_(cfg.damp * h.diagonal().mean())
    gen = torch.Generator().manual_seed(cfg.seed)
    codes, books, scales = initialise(w, cfg, gen)
    scales = update_scales(w, h, codes, books, scales)
    hist = [objective(w, scales[:, None] * reconstruct(codes, books), h)]
    for _ in range(cfg.iterations):
        for m in range(cfg.num_codebooks):
            codes = beam_search(w, h, codes, books, scales, m, cfg.beam_size)
        books = update_codebooks(w, h, codes, books, scales, cfg.adam_steps, cfg.lr)
        scales = update_scales(w, h, codes, books, scales)
        hist.append(objective(w, scales[:, None] * reconstruct(codes, books), h))
    return AQLMResult(codes, books, scales, hist)


class AQLM(Rounding):
    """The `aqlm` rounding: each decoder-layer linear becomes an AQLMLinear (codes, codebooks, scales)."""

    resumable = False  # its linears become AQLMLinear and it keeps a record per layer: it restarts

    name: ClassVar[str] = "aqlm"
    needs_hessian: ClassVar[bool] = True
    takes_transforms: ClassVar[bool] = False  # a transform's scales would be folded against an int grid

    def __init__(self, cfg: Optional[AQLMConfig] = None) -> None:
        self.cfg = cfg or AQLMConfig()
        self.layers: list[dict[str, Any]] = []  # per linear: bits, objective history, seconds
        self._result: Optional[AQLMResult] = None

    def check(self, spec: QuantSpec) -> None:
        if spec.activation is not None or spec.kv is not None:
            raise ValueError("ptq.method=aqlm is weight-only; set quant.activation=null and quant.kv=null")
        if self.cfg.nbits_per_codebook > 16:
            raise ValueError("ptq.aqlm.nbits_per_codebook is at most 16 (int16 codes)")

    def round(self, weight: torch.Tensor, spec: TensorSpec, h: Optional[torch.Tensor],
              nvfp4_exp: Optional[torch.Tensor] = None) -> Rounded:
        t0 = time.perf_counter()
        self._result = r = aqlm(weight, h, self.cfg)
        self._seconds = time.perf_counter() - t0
        return r.weight().to(weight.dtype), None, r.scales, None

    def freeze(self, layer: nn.Module, name: str, q: QuantLinear, rounded: Rounded) -> None:
        """Replace the QuantLinear by an AQLMLinear holding the last `round`'s codes, codebooks and scales."""
        r, c = self._result, self.cfg
        new = AQLMLinear.from_codes(r.codes, r.codebooks, r.scales, q.bias, q.weight.dtype, c.nbits_per_codebook)
        layer.set_submodule(name, new)
        self.layers.append({"name": name, "bits_per_weight": bits_per_weight(new), "objective": r.history,
                            "weights": new.in_features * new.out_features, "seconds": self._seconds})
        self._result = None

    def finish(self, model: nn.Module, report: Any) -> None:
        """The model's config records the AQLM layout (transformers' quantization_config and distqat's own key)."""
        record = finish_model(model, self.cfg.num_codebooks, self.cfg.nbits_per_codebook, self.cfg.in_group_size)
        report.extra["aqlm"] = {**record, "layers": self.layers}


def prepare_finetune(student: nn.Module, record: dict[str, Any], source: Path) -> nn.Module:
    """An AQLM folder's model (loaded by `qat.load`) set up as a QAT student, as AQLM's own fine-tuning trains it:
    codebooks and scales trainable, the codes frozen; its config records it as fine-tuned. `record` is the
    folder's AQLM record, `source` the folder (named in errors)."""
    for name, p in student.named_parameters():
        p.requires_grad_(name.endswith((".codebooks", ".scales")))
    skip = [n for n, mod in student.named_modules() if isinstance(mod, torch.nn.Linear)]
    # Saved as transformers reads AQLM folders (load_aqlm dropped it to build the model by hand).
    setattr(student.config, HF_QUANT_KEY, aqlm_config(record["num_codebooks"], record["nbits_per_codebook"],
                                                      record["in_group_size"], skip))
    if not any(isinstance(mod, AQLMLinear) for mod in student.modules()):
        raise ModelError(f"{source}: an AQLM folder without AQLM layers")
    setattr(student.config, AQLM_KEY, {**record, "finetuned": True})
    return student

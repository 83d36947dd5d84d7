"""PTQ of fused MoE experts (`qat.experts.QuantExperts`): each expert rounded on the tokens routed to it.

A fused experts module holds every expert's up (gate-and-up) and down weights stacked in two 3-D parameters, with one
`WeightQuantizer` per parameter over the stacked (E*out, in) rows, so each expert row has its own scale. A rounding
that needs no calibration (RTN, HQQ) rounds the stacked rows as one weight: its rows are independent, so that is each
expert rounded on its own. A rounding that needs a Hessian (GPTQ) rounds expert by expert, each with the Hessian
H_e = X_e^T X_e / n_e of its own inputs (the scale of H does not change GPTQ): for the up projection the hidden states
of the n_e tokens the router sent to expert e, for the down projection its gated activations on those tokens,
computed with the already rounded up weight (and the up input's fake quant) when the rounding is sequential, as GPTQ
does for a block's linears. Routing weights do not enter H, as for every other linear. An expert routed fewer tokens
than `ptq.gptq.moe_min_tokens_per_column` x the projection's input width (or none) takes the layer's pooled Hessian
instead: every token that reached the MoE layer, run through that expert for the statistics only; the report counts
those experts. The result is frozen as a linear's is (`grid.freeze_experts`): the weight on the grid, each expert
row's scale and zero point in the stacked quantizer's lsq parameters, which is what the fake-quant forward computes
with. AWQ and SmoothQuant take each expert's up -> down fold from here (`down_foldable`, `fold_down`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations import moe as hf_moe

from ..experts import QuantExperts, activate
from ..quantizers import WeightQuantizer
from ..spec import TensorSpec
from .blocks import Routed, block_groups, fold, foldable, run_block
from .fp4grid import tensor_exponent
from .gram import gram
from .grid import freeze_experts, rtn
from .parts import PTQReport, Rounding

# transformers' gate for [gate; up] rows (the experts decorator installs it where a class has no gate of its own).
_DEFAULT_GATE = getattr(hf_moe, "_default_apply_gate", None)


def quantized_experts(module: nn.Module) -> dict[str, QuantExperts]:
    """The fused experts modules under `module` whose weights are fake-quantized, by name."""
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantExperts) and len(m.weight_quantizers)}


class ExpertsOff:
    """Holds the quantizers of experts modules taken out (they run in full precision); `on` puts one back."""

    def __init__(self, mods: dict[str, QuantExperts]) -> None:
        self.mods = mods
        self.saved: dict[tuple[str, str, str], nn.Module] = {}
        for n, m in mods.items():
            for attr in ("weight_quantizers", "input_quantizers"):
                held = getattr(m, attr)
                for p in list(held.keys()):
                    self.saved[(n, attr, p)] = held[p]
                    del held[p]

    def weight_quantizer(self, name: str, param: str) -> Optional[WeightQuantizer]:
        return self.saved.get((name, "weight_quantizers", param))

    def on(self, name: str, param: str) -> None:
        for attr in ("weight_quantizers", "input_quantizers"):
            q = self.saved.pop((name, attr, param), None)
            if q is not None:
                getattr(self.mods[name], attr)[param] = q


@contextmanager
def experts_off(mods: dict[str, QuantExperts]) -> Iterator[ExpertsOff]:
    """Run these experts modules in full precision; every quantizer is back on afterwards."""
    off = ExpertsOff(mods)
    try:
        yield off
    finally:
        for n, _, p in list(off.saved):
            off.on(n, p)


def down_inputs(module: QuantExperts, x: torch.Tensor, e: int, w_up: torch.Tensor, quantize: bool) -> torch.Tensor:
    """Expert e's down-projection inputs for tokens x (before the down input's fake quant, as a linear's pre-hook
    sees them), from its (E, out, in) up weights `w_up`; `quantize` applies the up input's fake quant."""
    lay = module.expert_layout
    x = x.to(w_up.dtype)
    if quantize:
        x = module.quantized_input(lay.up, x)
    bias = getattr(module, f"{lay.up}_bias")[e].to(w_up.dtype) if lay.bias else None
    return activate(module, F.linear(x, w_up[e], bias), module.expert_layout)


def down_foldable(module: QuantExperts) -> bool:
    """Whether a per-channel scale of the down projection's input folds exactly into the up rows: transformers'
    default gate act(gate) * up over [gate; up] rows is linear in up; gpt-oss's own gate clamps up and adds 1 to it
    (interleaved rows), and an ungated act(up) is not linear."""
    own = getattr(type(module), "_apply_gate", None)
    return module.expert_layout.gated and (own is None or own is _DEFAULT_GATE)


@torch.no_grad()
def fold_down(module: QuantExperts, e: int, s: torch.Tensor) -> None:
    """Expert e's down inputs divided by s (its up rows, and their bias), its down columns multiplied by s."""
    lay = module.expert_layout
    up, down = module.canonical(lay.up), module.canonical(lay.down)
    i = s.numel()
    up[e, i:].div_(s.to(up)[:, None])
    if lay.bias:
        getattr(module, f"{lay.up}_bias")[e, i:].div_(s.to(up))
    down[e].mul_(s.to(down)[None, :])


def hessian(x: torch.Tensor) -> torch.Tensor:
    """X^T X / n of the rows of x, in float32 (float64 for a float64 x), as the block loop's `Stats` holds it."""
    x = x.reshape(-1, x.shape[-1])
    x = x.double() if x.dtype == torch.float64 else x.float()
    return gram(x).div_(max(x.shape[0], 1))


def min_tokens(ratio: float, width: int) -> int:
    """Fewest routed tokens an expert's own Hessian is built from (an expert no token reached never has one)."""
    return max(1, math.ceil(ratio * width))


@torch.no_grad()
def round_experts(name: str, module: QuantExperts, off: ExpertsOff, rounding: Rounding, routed: Optional[Routed],
                  report: PTQReport, prefix: str) -> None:
    """Round and freeze every quantized parameter of one experts module (up before down), switching each back on."""
    lay = module.expert_layout
    seq = rounding.sequential
    fp_up = module.canonical(lay.up).detach().clone() if rounding.needs_hessian and not seq else None
    for param in lay.params:
        wq = off.weight_quantizer(name, param)
        if wq is None:
            off.on(name, param)  # input quantizers only
            continue
        t0 = time.perf_counter()
        w = module.canonical(param).detach()
        e_, o_, i_ = w.shape
        row: dict = {"experts": e_}
        if not rounding.needs_hessian:
            deq, _, scale, zero = rounding.round(w.reshape(e_ * o_, i_), wq.spec, None)
        else:
            if routed is None:
                raise RuntimeError(f"{prefix}{name}: {rounding.name} needs the experts' routed calibration tokens")
            w_up = None
            if param == lay.down:
                w_up = module.quantized_weight(lay.up) if seq else fp_up
            deq, scale, zero, fallback, n_min = _per_expert(module, param, w, wq.spec, rounding, routed, w_up, seq)
            row.update(routed_tokens=routed.counts(e_), min_tokens=n_min, fallback_experts=fallback)
            moe = report.extra.setdefault("moe", {"fallback_experts": 0})
            moe["fallback_experts"] += fallback
        off.on(name, param)
        freeze_experts(module, param, deq, scale, zero)
        full = f"{prefix}{name}.{param}"
        report.add(full, time.perf_counter() - t0, rounding.name)
        report.annotate(full, **row)


def _per_expert(module: QuantExperts, param: str, w: torch.Tensor, spec: TensorSpec, rounding: Rounding,
                routed: Routed, w_up: Optional[torch.Tensor], quantize: bool):
    """(weight (E, out, in), scale rows, zero rows or None, experts that fell back, the threshold) of one
    parameter rounded expert by expert, each with the Hessian of its routed tokens' inputs."""
    if spec.granularity == "tensor":
        raise ValueError(f"ptq.method={rounding.name}: a per-tensor weight scale is shared by all the experts of a "
                         "fused experts module, so they cannot be rounded one by one; use per-channel or per-group "
                         "weights (e.g. quant.scheme=w4g128) or ptq.method=rtn")
    lay = module.expert_layout
    n_min = min_tokens(rounding.moe_min_tokens_per_column, w.shape[-1])
    # The stacked parameter's quantizer holds one NVFP4 tensor scale for every expert: each expert rounds over it.
    k = tensor_exponent(w.reshape(-1, spec.group_size)) if spec.format == "nvfp4" else None
    pooled_up: Optional[torch.Tensor] = None
    deqs, scales, zeros, fallback = [], [], [], 0
    for e, n_e in enumerate(routed.counts(w.shape[0])):
        own = n_e >= n_min
        fallback += not own
        x = routed.tokens(e) if own else routed.x
        if param == lay.up:
            if not own:
                pooled_up = hessian(x) if pooled_up is None else pooled_up
            h = hessian(x) if own else pooled_up
        else:
            h = hessian(down_inputs(module, x, e, w_up, quantize))
        deq, _, scale, zero = rounding.round(w[e], spec, h, k)
        deqs.append(deq)
        scales.append(scale.reshape(-1, 1))
        zeros.append(None if zero is None else zero.reshape(-1, 1))
    zero = None if zeros[0] is None else torch.cat(zeros)
    return torch.stack(deqs), torch.cat(scales), zero, fallback, n_min


@torch.no_grad()
def freeze_rtn_experts(module: QuantExperts) -> None:
    """RTN-freeze every quantized parameter of an experts module (one the block loop does not reach)."""
    for param, wq in module.weight_quantizers.items():
        w = module.canonical(param).detach()
        e, o, i = w.shape
        deq, _, scale, zero = rtn(w.reshape(e * o, i), wq.spec, w.dtype)
        freeze_experts(module, param, deq, scale, zero)


@torch.no_grad()
def check_folds(layer: nn.Module, x: torch.Tensor, kwargs: dict, method: str) -> None:
    """One-line ValueError unless the folds AWQ and SmoothQuant make in an MoE layer leave it the same function: on a
    copy, every group's op before it divides by a random positive scale and the group's weights (router, shared
    experts, the experts' up; each expert's up rows and down columns) multiply by it, and the copy's output on a
    calibration batch must equal the layer's. Layouts the block groups do not describe (a norm whose output reaches
    something else, a second norm in the MLP's path) fail here instead of giving a broken model."""
    twin = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(0)
    for g in block_groups(twin):
        if g.prev_kind == "experts":
            for n in g.experts:
                m = twin.get_submodule(n)
                if isinstance(m, QuantExperts) and down_foldable(m):
                    width = m.canonical(m.expert_layout.down).shape[-1]
                    for e in range(m.expert_layout.num_experts):
                        fold_down(m, e, torch.randn(width, generator=gen).mul(0.5).exp())
        elif foldable(twin, g):
            prev = twin.get_submodule(g.prev_name)
            width = prev.weight.shape[0]
            fold(twin, g, torch.randn(width, generator=gen).mul(0.5).exp().to(prev.weight.device))
    want, got = run_block(layer, [x], [kwargs])[0].float(), run_block(twin, [x], [kwargs])[0].float()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    tol = 1e-3 if x.dtype in (torch.float32, torch.float64) else 5e-2
    if not err <= tol:
        raise ValueError(f"ptq.method={method}: folding scales into {type(layer).__name__}'s norms and linears changes "
                         f"what it computes (relative change {err:.3g}), so its MoE layout is not the one the folds "
                         "assume; use gptq, rtn or hqq")

"""Speed-ups of the fake-quant student's step, each selectable (`train.speedups`), each computing the numbers of
the reference path (qat.linear, qat.kv), which stays the default and the oracle:

- norm_quant: the RMSNorm before q/k/v (and before gate/up) also fake-quantizes its output for its readers,
  in one pass (a Triton kernel on CUDA; the reference ops in one autograd node elsewhere); the readers find
  it in the model's SharedInput memo and do not quantize again. Backward: the RMSNorm's (STE through the
  quant), from the saved input, weight and rstd. Only where every reader has the same dynamic per-token
  int min/max spec and the norm computes Hugging Face's LlamaRMSNorm (checked on a probe input).
- weight_batch: the weights of a decoder layer whose quantizers share one non-learnable min/max int spec and
  row length are fake-quantized by one call on their concatenated rows, split back (STE through cat/split).
  The first linear of a group to need its weight in a forward computes the group's; each takes its own once,
  so a gradient-checkpointing recompute batches again, and nothing outlives the layer's forward.
- kv_direct: the per-token (or per-head) K/V scales reduced over the (batch, heads, tokens, head_dim) tensor
  in place, without the reference's transpose/reshape into rows.

Under torch.compile all three step aside (the traced reference ops fuse there); `compile` itself is the
trainer's (`enable` accepts and ignores the name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from . import quantizers
from .kernels import fused_rms_norm_quant
from .kv import attention_modules
from .linear import QuantLinear, SharedInput
from .options import SPEEDUPS
from .quantizers import ActQuantizer, act_rows, weight_rows
from .spec import TensorSpec

TRAINER_SPEEDUPS = ("compile",)  # accepted by `enable`, applied by the trainer


def _plain_int_minmax(spec: Optional[TensorSpec]) -> bool:
    return (spec is not None and spec.format == "int" and spec.scale_method == "minmax"
            and spec.learnable == "none" and spec.dynamic)


# ---------------------------------------------------------------------------------------------
# norm_quant


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hugging Face's LlamaRMSNorm of x, its rstd): the same ops, so the same bits."""
    in_dtype = x.dtype
    h = x.to(torch.float32)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h * rstd).to(in_dtype), rstd


class _RMSNormQuant(torch.autograd.Function):
    """Forward: RMSNorm, cast to the readers' compute dtype, per-token fake quant. Backward: the RMSNorm's,
    op for op what autograd computes through the reference (bit for bit), the quant an identity (STE)."""

    @staticmethod
    def forward(ctx, x, x_again, weight, eps: float, spec: TensorSpec, dtype: Optional[torch.dtype]):  # type: ignore[override]
        n = x.shape[-1]
        fused = fused_rms_norm_quant(x.reshape(-1, n), weight, eps, spec.bits, spec.symmetric, dtype)
        if fused is not None:
            out, rstd = fused[0].reshape(x.shape), fused[1].reshape(*x.shape[:-1], 1)
        else:
            y, rstd = rms_norm(x, weight, eps)
            y = y if dtype is None else y.to(dtype)
            out = quantizers.fake_quant(act_rows(y, spec), spec).reshape(y.shape)
        ctx.save_for_backward(x, weight, rstd)
        ctx.y_dtype = torch.promote_types(weight.dtype, x.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        in_dtype, h = x.dtype, x.to(torch.float32)
        g = g.to(ctx.y_dtype)  # the readers' cast to the autocast dtype, backwards
        gx = gx_again = gw = None
        if ctx.needs_input_grad[2]:
            gw = (g * (h * rstd).to(in_dtype)).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gn = (g * weight).to(in_dtype).to(torch.float32)
            gr = (gn * h).sum_to_size(rstd.shape)
            gx = gn * rstd  # through h * rstd
            # through rstd: rsqrt' = -0.5 * grad * result^3, mean' = grad / n, pow(2)' = grad * 2h
            gx_again = (-0.5 * gr * rstd.pow(3)) / h.shape[-1] * (2.0 * h)
            if in_dtype != torch.float32:  # x.float() is a node of its own: it sums both, then casts
                gx, gx_again = (gx + gx_again).to(in_dtype), None
            # else h is x: autograd adds the two to x's other gradients one by one, and so does x_again.
        return gx, gx_again, gw, None, None, None


class FakeQuantRMSNorm(nn.Module):
    """An RMSNorm whose output is also fake-quantized for the linears that read it: it computes what the
    norm then the readers' ActQuantizer compute and leaves the result in their SharedInput memo. Holds the
    norm's own `weight` Parameter (same state_dict key); `disable` puts the original module back. Where the
    readers have no memo (or under torch.compile) it is the plain norm, and the readers quantize."""

    def __init__(self, norm: nn.Module, eps: float, reader: ActQuantizer) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = eps
        self.spec = reader.spec
        self.__dict__["original"] = norm  # not a submodule: its weight is this one's
        self.__dict__["reader"] = reader  # the first reader's input quantizer: its memo, looked up each time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memo = None if torch.compiler.is_compiling() else getattr(self.reader, "shared", None)
        if not isinstance(memo, SharedInput):
            return rms_norm(x, self.weight, self.variance_epsilon)[0]
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        out = _RMSNormQuant.apply(x, x, self.weight, self.variance_epsilon, self.spec, dt)
        memo.put(out, self.spec, dt, out)  # what QuantLinear.quantized_input(out, dt) returns
        return out

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, then {quantizers._describe(self.spec)}"


def _rmsnorm_eps(m: Any) -> Optional[float]:
    """eps of a Llama-family RMSNorm (a class named *RMSNorm with a 1-D weight), else None."""
    w = getattr(m, "weight", None)
    if not type(m).__name__.endswith("RMSNorm") or not isinstance(w, nn.Parameter) or w.dim() != 1:
        return None
    for name in ("variance_epsilon", "eps"):
        eps = getattr(m, name, None)
        if isinstance(eps, (float, int)) and not isinstance(eps, bool):
            return float(eps)
    return None


@torch.no_grad()
def _computes_llama_norm(norm: nn.Module, eps: float) -> bool:
    """Whether `norm` gives rms_norm's bits on probe inputs (Gemma's 1 + weight, say, does not)."""
    w = norm.weight
    if w.device.type == "meta" or w.numel() == 0:
        return False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, w.shape[0], generator=g) * 3
    return all(torch.equal(norm(x.to(w.device, dt)), rms_norm(x.to(w.device, dt), w, eps)[0])
               for dt in {w.dtype, torch.float32})


def _readers(layer: nn.Module) -> list[tuple[str, list[Any]]]:
    """(norm attribute, the linears that read its output directly) in a Llama-family decoder layer."""
    out = []
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    for norm, parent, groups in (("input_layernorm", attn, (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))),
                                 ("post_attention_layernorm", mlp, (("gate_proj", "up_proj"), ("gate_up_proj",)))):
        if parent is None or (norm == "post_attention_layernorm" and hasattr(layer, "pre_feedforward_layernorm")):
            continue  # Gemma 2/3 normalize the attention output there, not the MLP input
        for names in groups:
            if all(hasattr(parent, n) for n in names):
                out.append((norm, [getattr(parent, n) for n in names]))
                break
    return out


def _why_not(norm: nn.Module, readers: list[Any]) -> Optional[str]:
    """Why `norm` cannot be fused with the fake quant of `readers`; None when it can."""
    if isinstance(norm, FakeQuantRMSNorm):
        return "fused already"
    eps = _rmsnorm_eps(norm)
    if eps is None:
        return f"{type(norm).__name__} is not an RMSNorm with weight and eps"
    if not readers or not all(isinstance(m, QuantLinear) and m.input_quantizer is not None for m in readers):
        return "its readers do not all quantize their input"
    spec = readers[0].input_quantizer.spec
    if any(m.input_quantizer.spec != spec for m in readers) or not _plain_int_minmax(spec) \
            or spec.granularity != "token":
        return "its readers' activation specs are not one dynamic per-token int min/max spec"
    memos = {id(getattr(m.input_quantizer, "shared", None)) for m in readers}
    if not isinstance(getattr(readers[0].input_quantizer, "shared", None), SharedInput) or len(memos) != 1:
        return "its readers share no SharedInput memo"
    if not _computes_llama_norm(norm, eps):
        return f"{type(norm).__name__} does not compute LlamaRMSNorm's numbers"
    return None


def _enable_norm_quant(model: nn.Module) -> list[str]:
    fused: dict[str, int] = {}
    why_not: dict[str, int] = {}
    for _, layer in _decoder_layers(model):
        for attr, readers in _readers(layer):
            norm = getattr(layer, attr)
            why = _why_not(norm, readers)
            if why is not None:
                why_not[why] = why_not.get(why, 0) + 1
                continue
            setattr(layer, attr, FakeQuantRMSNorm(norm, _rmsnorm_eps(norm), readers[0].input_quantizer))
            fused[attr] = fused.get(attr, 0) + 1
    if not fused and not why_not:
        return ["norm_quant: no Llama-family decoder layers found; nothing fused"]
    lines = [f"norm_quant: {n} x {attr} fused with the per-token fake quant of its readers"
             for attr, n in fused.items()]
    return lines + [f"norm_quant: {n} norm(s) left alone: {why}" for why, n in why_not.items()]


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("DecoderLayer")]


# ---------------------------------------------------------------------------------------------
# weight_batch


class WeightBatch:
    """Linears whose weights one fake-quant call can take together (equal spec, equal row length).

    `take(linear, dtype)` hands each linear its fake-quantized weight once per computation: the first taker
    computes the whole group; an entry is used only for the same weight tensor, version, dtype and grad mode.
    """

    __slots__ = ("linears", "spec", "ready")

    def __init__(self, linears: list[QuantLinear], spec: TensorSpec) -> None:
        self.linears, self.spec = linears, spec
        self.ready: dict[int, tuple] = {}

    def clear(self) -> None:
        self.ready = {}

    def take(self, linear: QuantLinear, dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
        key = (dtype, torch.is_grad_enabled())
        hit = self.ready.pop(id(linear), None)
        if hit is not None and hit[0] is linear.weight and hit[1] == linear.weight._version and hit[2] == key:
            return hit[3]
        params = [m.weight for m in self.linears]
        if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: the others' weights are not gathered here
            return None
        ws = [p if dtype is None else p.to(dtype) for p in params]
        if len({(w.dtype, w.device) for w in ws}) != 1:
            return None
        rows = [weight_rows(w, self.spec) for w in ws]
        parts = quantizers.fake_quant(torch.cat(rows), self.spec, ws[0].dtype).split([r.shape[0] for r in rows])
        self.ready, mine = {}, None
        for m, p, w, q in zip(self.linears, params, ws, parts):
            if m is linear:
                mine = q.reshape(w.shape)
            else:
                self.ready[id(m)] = (p, p._version, key, q.reshape(w.shape))
        return mine


class _ClearBatches:
    """Forward pre-hook and hook of a decoder layer: its WeightBatches start and end each forward empty."""

    def __init__(self, batches: list[WeightBatch]) -> None:
        self.batches = batches

    def __call__(self, module: nn.Module, *args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        for b in self.batches:
            b.clear()


def _row_length(m: QuantLinear) -> int:
    spec = m.weight_quantizer.spec
    return {"tensor": m.weight.numel(), "channel": m.in_features}.get(spec.granularity, spec.group_size)


def _enable_weight_batch(model: nn.Module) -> list[str]:
    n_layers, sizes, already = 0, [], 0
    for _, layer in _decoder_layers(model):
        if any(isinstance(h, _ClearBatches) for h in layer._forward_pre_hooks.values()):
            already += 1
            continue
        groups: list[tuple[TensorSpec, int, list[QuantLinear]]] = []
        for m in layer.modules():
            if not isinstance(m, QuantLinear) or m.weight_quantizer is None:
                continue
            spec = m.weight_quantizer.spec
            if not _plain_int_minmax(spec):
                continue
            same = [g for g in groups if g[0] == spec and g[1] == _row_length(m)]
            if same:
                same[0][2].append(m)
            else:
                groups.append((spec, _row_length(m), [m]))
        batches = [WeightBatch(ms, spec) for spec, _, ms in groups if len(ms) > 1]
        if not batches:
            continue
        for b in batches:
            for m in b.linears:
                m.weight_batch = b
        hook = _ClearBatches(batches)
        layer.register_forward_pre_hook(hook)
        layer.register_forward_hook(hook, always_call=True)
        n_layers += 1
        sizes += [len(b.linears) for b in batches]
    lines = [f"weight_batch: {already} decoder layers batched already"] if already else []
    if n_layers:
        lines.append(f"weight_batch: {n_layers} decoder layers, {len(sizes)} groups of {min(sizes)}-{max(sizes)} "
                     "weights fake-quantized in one call each")
    return lines or ["weight_batch: no decoder layer has two weights with one plain min/max spec and row length"]


# ---------------------------------------------------------------------------------------------
# kv_direct


def kv_direct(quantizer: ActQuantizer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """qat.kv.fake_quant_kv's numbers for (batch, heads, tokens, head_dim) K/V with per-token or per-head
    dynamic min/max int scales, reduced over the tensor as it lies; None for anything else (the reference)."""
    spec = quantizer.spec
    if x.dim() != 4 or not _plain_int_minmax(spec) or spec.granularity not in ("token", "head"):
        return None
    dims = (1, 3) if spec.granularity == "token" else (3,)
    r = x.detach().float()
    scale, zero = quantizers.range_qparams(r.amin(dims, keepdim=True), r.amax(dims, keepdim=True), spec)
    with torch.no_grad():
        out = quantizers.fake_quant_values(x, scale, zero, spec).to(x.dtype)
    return quantizers.ste(x, out)


def _enable_kv_direct(model: nn.Module) -> list[str]:
    n = 0
    for _, attn in attention_modules(model):
        for name in ("k_quantizer", "v_quantizer"):
            q = getattr(attn, name, None)
            if isinstance(q, ActQuantizer):
                q.fast_kv = kv_direct
                n += 1
    if not n:
        return ["kv_direct: the model's KV cache is not fake-quantized; nothing changed"]
    return [f"kv_direct: {n} K/V quantizers scale the (batch, heads, tokens, head_dim) tensors in place"]


# ---------------------------------------------------------------------------------------------
# enable / disable

_ENABLE = {"norm_quant": _enable_norm_quant, "weight_batch": _enable_weight_batch, "kv_direct": _enable_kv_direct}


def enable(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Apply the named speed-ups to a model passed through qat.apply.quantize_model; returns one line per change.
    "compile" is accepted and left to the caller. ValueError for a name not in SPEEDUPS."""
    if isinstance(names, str):
        names = [names]
    known = TRAINER_SPEEDUPS + SPEEDUPS
    for name in names:
        if name not in known:
            raise ValueError(f"unknown speed-up {name!r}; known: {', '.join(known)}")
    return [line for name in SPEEDUPS if name in names for line in _ENABLE[name](model)]


def disable(model: nn.Module) -> None:
    """Undo `enable`: the original norms, no weight batches, the reference K/V fake quant."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, FakeQuantRMSNorm):
                setattr(parent, child_name, child.original)
        for hooks in (parent._forward_pre_hooks, parent._forward_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, _ClearBatches)]:
                del hooks[key]
                parent._forward_hooks_always_called.pop(key, None)
        if isinstance(parent, QuantLinear):
            parent.__dict__.pop("weight_batch", None)
        if isinstance(parent, ActQuantizer):
            parent.__dict__.pop("fast_kv", None)


__all__ = ["SPEEDUPS", "enable", "disable", "FakeQuantRMSNorm", "WeightBatch", "kv_direct", "rms_norm"]

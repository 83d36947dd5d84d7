"""PackedExperts: the frozen QLoRA base of a fused mixture-of-experts module, every expert held as codes.

A fake-quant `qat.experts.QuantExperts` module becomes a `PackedExperts` of the same model class (the class is
swapped, as `QuantExperts.wrap` does, so the model's router, MoE block and decoder stay its own code). Each
stacked projection (`gate_up_proj` or `up_proj`, and `down_proj`) is replaced by a `PackedExpertStack` child of
the same name: the weight quantizer's codes, scales and zero points over the (E*out, in) rows it quantizes, in
`PackedLinear`'s layout (int codes packed in int32 words, int8 codes, NF4 indices, optionally double-quantized
NF4 scales). Biases (gpt-oss) stay the model's own frozen parameters.

The forward groups the routed copies of the tokens by expert and calls each stack once for all experts; a stack
dequantizes one expert at a time, in forward and again in backward (`_GroupedMatmul`), so no weight-sized tensor
is kept for backward and an expert that gets no token is never dequantized. `qat.experts.expert_loop` computes
from (E, out, in) weight tensors and leaves them to autograd, which would keep every expert's dequantized weight
alive until backward; the order of operations per token is the same (the tests hold the two equal in float64).
The stacks are modules so that peft can put per-expert adapters on them (`qat.qlora.expert_adapters`): peft's
own `target_parameters` parametrizes an `nn.Parameter` (W + dW materialised for every expert), which a packed
base does not have.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..experts import ExpertsLayout, QuantExperts, activate
from ..spec import TensorSpec
from .packed import PackedLinear


def spans(counts: list[int]) -> Iterator[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert with rows, for rows grouped by expert in expert order."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


class _GroupedMatmul(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ W_e^T for every expert; W_e dequantized in forward and again in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stack: PackedExpertStack, counts: list[int],  # type: ignore[override]
                dtype: torch.dtype) -> torch.Tensor:
        ctx.stack, ctx.counts, ctx.dtype, ctx.x_dtype = stack, counts, dtype, x.dtype
        x = x.to(dtype)
        out = x.new_zeros(x.shape[0], stack.expert_out)
        for e, lo, hi in spans(counts):
            out[lo:hi] = F.linear(x[lo:hi], stack.expert_weight(e, dtype))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.to(ctx.dtype)
        gx = grad.new_zeros(grad.shape[0], ctx.stack.in_features)
        for e, lo, hi in spans(ctx.counts):
            gx[lo:hi] = grad[lo:hi] @ ctx.stack.expert_weight(e, ctx.dtype)
        return gx.to(ctx.x_dtype), None, None, None


class PackedExpertStack(PackedLinear):
    """One projection of every expert, packed as the (E*out, in) rows its weight quantizer quantized.

    As a `PackedLinear` over those rows it shares the layout, the NF4 double quantization, `dequantized_weight`
    (every expert at once, (E*out, in)) and the merges' grid code; `expert_weight` dequantizes one expert's rows
    with the same arithmetic, and `forward(x, counts)` takes rows grouped by expert.
    """

    def __init__(
        self, num_experts: int, in_features: int, out_features: int, weight_spec: TensorSpec,
        act_spec: Optional[TensorSpec], dtype: torch.dtype = torch.bfloat16, device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(in_features, num_experts * out_features, weight_spec, act_spec, False, dtype, device)
        self.num_experts, self.expert_out = num_experts, out_features

    @classmethod
    @torch.no_grad()
    def from_quant_experts(cls, module: QuantExperts, param: str, double_quant: bool = False) -> PackedExpertStack:
        """Pack `module.<param>` with its weight quantizer's own codes, scales and zero points (its input
        quantizer, calibrated or not, moves over as it is)."""
        w = module.canonical(param).detach()
        e, o, i = w.shape
        rows = w.reshape(e * o, i)
        wq = module.weight_quantizers[param]
        aq = module.input_quantizers[param] if param in module.input_quantizers else None
        m = cls(e, i, o, wq.spec, None if aq is None else aq.spec, w.dtype, w.device)
        if m.nf4 and double_quant:
            m._pack_nf4_double_quant(rows)
        else:
            codes, scale, zero = wq.quantize(rows)
            if not m.nf4 and wq.spec.symmetric:
                codes = codes + (1 << (wq.spec.bits - 1))
            m._store(codes, scale.expand_as(m.scale).to(w.dtype), None if zero is None else zero.expand_as(m.scale))
        if aq is not None:
            m.input_quantizer = aq
        return m

    def expert_weight(self, e: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Expert e's (out, in) weight in `dtype`: `dequantized_weight`'s rows of e."""
        return self.dequantized_weight(dtype, rows=slice(e * self.expert_out, (e + 1) * self.expert_out))

    def experts_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Every expert's weight at once, (E, out, in)."""
        return self.dequantized_weight(dtype).reshape(self.num_experts, self.expert_out, self.in_features)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:  # type: ignore[override]
        """(rows, in) inputs grouped by expert (counts[e] rows for expert e, in expert order) -> (rows, out)."""
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        if dt is not None:
            x = x.to(dt)  # as PackedLinear: quantize in the dtype the matmul sees
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return _GroupedMatmul.apply(x, self, counts, dt or self.compute_dtype)

    def extra_repr(self) -> str:
        layer = super().extra_repr().replace(f"out={self.out_features}", f"out={self.expert_out}")
        return f"{self.num_experts} experts, each {layer}"


class PackedExperts(nn.Module):
    """The packed side of a fused experts module; `pack` mixes it in front of the module's own class."""

    expert_layout: ExpertsLayout
    _own_class: type

    @classmethod
    def pack(cls, module: QuantExperts, double_quant: bool = False) -> nn.Module:
        """Make a fake-quant experts module packed, in place; every stacked projection must have a weight
        quantizer (the caller refuses the others, naming them)."""
        layout = module.expert_layout
        stacks = {p: PackedExpertStack.from_quant_experts(module, p, double_quant) for p in layout.params}
        module.unwrap()
        for p, stack in stacks.items():
            del module._parameters[p]
            module.add_module(p, stack)
        module.__class__ = _packed_class(type(module))
        module.expert_layout = layout
        return module.requires_grad_(False)

    def stacks(self) -> dict[str, nn.Module]:
        """param name -> its stack (or the peft layer that wraps it)."""
        return {p: getattr(self, p) for p in self.expert_layout.params}

    def restore(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        """Back to the model's own class with `weights` ((E, out, in) per param) as its frozen parameters, stored
        the model's way (transposed in gpt-oss); the stacks are dropped."""
        layout = self.expert_layout
        for p in layout.params:
            del self._modules[p]
            w = weights[p].transpose(1, 2) if layout.transposed else weights[p]
            self.register_parameter(p, nn.Parameter(w.contiguous(), requires_grad=False))
        self.__class__ = self._own_class
        del self.expert_layout
        return self

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        lay = self.expert_layout
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        k = top_k_index.reshape(x.shape[0], -1).shape[1]
        flat = top_k_index.reshape(-1)
        routing = top_k_weights.reshape(-1)
        with torch.no_grad():
            # the routed copies grouped by expert, each expert's in token order (as expert_loop visits them);
            # slots at or past num_experts are expert parallelism's sentinel: routed to another rank
            order = torch.argsort(flat, stable=True)
            order = order[flat[order] < lay.num_experts]
            counts = torch.bincount(flat[order], minlength=lay.num_experts).tolist()
        token, expert = order // k, flat[order]
        h = getattr(self, lay.up)(x[token], counts)
        if lay.bias:
            h = h + getattr(self, f"{lay.up}_bias")[expert].to(h.dtype)
        h = activate(self, h, lay)
        h = getattr(self, lay.down)(h, counts)
        if lay.bias:
            h = h + getattr(self, f"{lay.down}_bias")[expert].to(h.dtype)
        if lay.post_norm:
            h = self.post_expert_norm(h)
        h = h * routing[order, None]
        out = torch.zeros(x.shape, dtype=hidden_states.dtype, device=x.device)
        return out.index_add_(0, token, h.to(out.dtype)).reshape(shape)


_CLASSES: dict[type, type] = {}


def _packed_class(own: type) -> type:
    """One PackedExperts subclass per experts class, cached so every layer shares it."""
    if own not in _CLASSES:
        _CLASSES[own] = type(f"Packed{own.__name__}", (PackedExperts, own), {"_own_class": own})
    return _CLASSES[own]


def packed_experts(model: nn.Module) -> list[tuple[str, PackedExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PackedExperts)]


__all__ = ["PackedExperts", "PackedExpertStack", "packed_experts", "spans"]

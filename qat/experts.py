"""QuantExperts: fake quant of the fused 3-D expert tensors that transformers 5 holds MoE experts in.

transformers 5 stores a mixture-of-experts layer's experts as stacked parameters of one `*Experts` module
(`gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I); transposed, with biases, in gpt-oss), not as linears, so
replacing `nn.Linear` alone leaves them full precision. Every such class that transformers can dispatch to its
batched or grouped kernels is described by the flags `use_experts_implementation` sets on it (`has_gate`,
`has_bias`, `is_transposed`, `has_post_expert_norm`) plus its `_apply_gate` and `act_fn`; that description is
what this module computes from, so the model's router, its MoE block and its decoder stay its own code.

`QuantExperts.wrap` swaps the module's class for a subclass (as `QuantLinear.from_linear` keeps the Linear's
parameters): the parameters keep their names and storage, so state_dict keys, DeepSpeed and checkpoints see the
model they know. Before it swaps, it checks on a few random routed tokens that its forward, unquantized, equals
the module's own forward; a module it cannot describe raises `ExpertsLayoutError` naming the module and
parameter, and nothing is changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from .quantizers import ActQuantizer, WeightQuantizer
from .spec import TensorSpec


class ExpertsLayoutError(ValueError):
    """A module holds fused expert parameters in a layout QuantExperts cannot reproduce."""


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module computes: the up (or gate-and-up) and down parameters and their options."""

    up: str  # "gate_up_proj", or "up_proj" when the experts have no gate
    down: str
    gated: bool
    transposed: bool  # parameters stored (E, in, out) instead of (E, out, in)
    bias: bool
    post_norm: bool
    num_experts: int

    @property
    def params(self) -> tuple[str, str]:
        return (self.up, self.down)


def fused_params(module: nn.Module) -> list[str]:
    """The names of the module's own 3-D parameters: stacked expert tensors (biases aside; a convolution's kernel
    is 3-D too, and no expert)."""
    if isinstance(module, _ConvNd):
        return []
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and not n.endswith("bias")]


def describe(module: nn.Module, name: str) -> ExpertsLayout:
    """The layout of a fused experts module, from the flags transformers' experts decorator sets on it."""
    cls = type(module).__name__
    fused = fused_params(module)
    gated = bool(getattr(module, "has_gate", "gate_up_proj" in fused))
    up = "gate_up_proj" if gated else "up_proj"
    unknown = [p for p in fused if p not in (up, "down_proj")]
    if unknown or up not in fused or "down_proj" not in fused:
        what = unknown[0] if unknown else (up if up not in fused else "down_proj")
        raise ExpertsLayoutError(
            f"{name}.{what}: {cls} holds fused expert parameters {fused} in a layout distqat does not know "
            f"(expected {up} and down_proj); keep it full precision on purpose with quant.exclude=['{name}']"
        )
    if not hasattr(module, "has_gate") and not hasattr(module, "act_fn"):
        raise ExpertsLayoutError(
            f"{name}.{up}: {cls} is not a transformers experts class (no experts-implementation flags, no act_fn), "
            f"so its computation is unknown; keep it full precision on purpose with quant.exclude=['{name}']"
        )
    n_up, n_down = getattr(module, up).shape[0], module.down_proj.shape[0]
    if n_up != n_down:
        raise ExpertsLayoutError(
            f"{name}.{up}: {cls} holds {n_up} stacked {up} and {n_down} down_proj (experts without weights, such "
            f"as zero or identity experts?), a layout distqat does not know; keep it full precision on purpose with "
            f"quant.exclude=['{name}']")
    bias = bool(getattr(module, "has_bias", False))
    if bias and not all(hasattr(module, f"{p}_bias") for p in (up, "down_proj")):
        raise ExpertsLayoutError(f"{name}.{up}_bias: {cls} says it has biases but holds none under that name; keep "
                                 f"it full precision on purpose with quant.exclude=['{name}']")
    return ExpertsLayout(
        up=up, down="down_proj", gated=gated, transposed=bool(getattr(module, "is_transposed", False)), bias=bias,
        post_norm=bool(getattr(module, "has_post_expert_norm", False)),
        num_experts=getattr(module, up).shape[0],
    )


class QuantExperts(nn.Module):
    """The fake-quant side of a fused experts module; `wrap` mixes it in front of the module's own class.

    Weights are quantized per expert: each expert's rows (output channels, or groups along the input) get their
    own scale (and each expert its own NVFP4 tensor scale), held by one `WeightQuantizer` over the stacked
    (E*out, in) rows (so LSQ/LWC learn per expert row
    and the fused fake-quant kernel quantizes all experts in one call). The input of each projection is quantized
    per token, which for the routed copies of a token equals quantizing the token once before dispatch.
    """

    expert_layout: ExpertsLayout
    weight_quantizers: nn.ModuleDict
    input_quantizers: nn.ModuleDict
    routed_tokens: torch.Tensor

    @classmethod
    def wrap(
        cls, module: nn.Module, specs: dict[str, tuple[Optional[TensorSpec], Optional[TensorSpec]]], name: str,
        probe: bool = True,
    ) -> nn.Module:
        """Make `module` fake-quantize: specs maps each fused parameter to its (weight spec, input spec)."""
        if isinstance(module, QuantExperts):
            raise ValueError(f"{name} is fake-quantized already")
        layout = describe(module, name)
        if probe:
            check_forward(module, layout, name)
        module.__class__ = _quant_class(type(module))
        module.expert_layout = layout
        module.weight_quantizers = nn.ModuleDict()
        module.input_quantizers = nn.ModuleDict()
        for param in layout.params:
            wspec, aspec = specs.get(param, (None, None))
            if wspec is not None:
                w = module.canonical(param).detach()
                # NVFP4: one tensor scale per expert, as each expert exports (a linear of its own, gate and up
                # sharing it as vLLM's fused w13 wants), not one over the stack
                _, o, i = w.shape
                chunk = o * i // wspec.group_size if wspec.format == "nvfp4" else None
                q = WeightQuantizer(wspec, w.reshape(-1, i), global_rows=chunk)
                module.weight_quantizers[param] = q.to(w.device)
            if aspec is not None:
                module.input_quantizers[param] = ActQuantizer(aspec)
        module.register_buffer("routed_tokens", torch.zeros(layout.num_experts, dtype=torch.long,
                                                            device=getattr(module, layout.up).device), persistent=False)
        return module

    def unwrap(self) -> nn.Module:
        """Back to the model's own class, same parameters (the quantizers are dropped)."""
        for attr in ("weight_quantizers", "input_quantizers"):
            delattr(self, attr)
        del self._buffers["routed_tokens"]
        self.__class__ = self._own_class
        del self.expert_layout
        return self

    def quantized_params(self) -> list[str]:
        """The fused parameters whose values the forward fake-quantizes."""
        return list(self.weight_quantizers.keys())

    def canonical(self, param: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The stacked weight as (E, out, in), whichever way the model stores it."""
        w = getattr(self, param)
        w = w if dtype is None else w.to(dtype)
        return w.transpose(1, 2) if self.expert_layout.transposed else w

    def quantized_weight(self, param: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The fake-quantized stacked weight, (E, out, in), with STE gradients to the weight and quantizer."""
        w = self.canonical(param, dtype)
        q = self.weight_quantizers[param] if param in self.weight_quantizers else None
        if q is None:
            return w
        e, o, i = w.shape
        return q(w.reshape(e * o, i)).reshape(e, o, i)

    def quantized_input(self, param: str, x: torch.Tensor) -> torch.Tensor:
        q = self.input_quantizers[param] if param in self.input_quantizers else None
        return x if q is None else q(x)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        dt = torch.get_autocast_dtype(hidden_states.device.type) if torch.is_autocast_enabled(
            hidden_states.device.type) else None
        if not _recomputing():
            hit = top_k_index.reshape(-1).detach()
            self.routed_tokens += torch.bincount(hit, minlength=self.routed_tokens.numel() + 1)[
                : self.routed_tokens.numel()].to(self.routed_tokens.device)
        weights = {p: self.quantized_weight(p, dt) for p in self.expert_layout.params}
        return expert_loop(self, hidden_states, top_k_index, top_k_weights, weights, quantize=True)


def _recomputing() -> bool:
    """Inside a backward pass: gradient checkpointing recomputing this forward, whose tokens were counted once."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


def expert_loop(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    weights: dict[str, torch.Tensor], quantize: bool = False, layout: Optional[ExpertsLayout] = None,
) -> torch.Tensor:
    """The experts' computation over the tokens routed to each, from (E, out, in) weights.

    An expert that gets no token is not computed, so its weights get no gradient (zero, not NaN).
    """
    lay = layout or module.expert_layout
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    index = top_k_index.reshape(x.shape[0], -1)
    routing = top_k_weights.reshape(x.shape[0], -1)
    w_up, w_down = weights[lay.up], weights[lay.down]
    if w_up.dtype != x.dtype:
        x = x.to(w_up.dtype)
    if quantize:
        x = module.quantized_input(lay.up, x)
    b_up = getattr(module, f"{lay.up}_bias") if lay.bias else None
    b_down = getattr(module, f"{lay.down}_bias") if lay.bias else None
    out = torch.zeros(x.shape, dtype=hidden_states.dtype, device=x.device)
    for e, token, slot in routes(index, lay.num_experts):
        h = F.linear(x[token], w_up[e], None if b_up is None else b_up[e].to(w_up.dtype))
        h = activate(module, h, lay)
        if quantize:
            h = module.quantized_input(lay.down, h)
        h = F.linear(h, w_down[e], None if b_down is None else b_down[e].to(w_down.dtype))
        if lay.post_norm:
            h = module.post_expert_norm(h)
        h = h * routing[token, slot, None]
        out.index_add_(0, token, h.to(out.dtype))
    return out.reshape(shape)


def routes(index: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(expert, its tokens, their top-k slots) for each expert the (tokens, k) routing `index` hits; an expert
    with no token is not visited, so it gets no gradient (zero, not NaN)."""
    for e in torch.unique(index).tolist():
        if e >= num_experts:  # expert parallelism's sentinel: a slot routed to another rank
            continue
        token, slot = torch.where(index == e)
        yield e, token, slot


def activate(module: nn.Module, h: torch.Tensor, layout: ExpertsLayout) -> torch.Tensor:
    """The experts' activation of the up projection's output: act(up) for ungated experts (transformers installs a
    default gate on every experts class, unused there), the module's own gating of the gate-and-up output (gpt-oss
    clamps and interleaves), else act(gate) * up."""
    if not layout.gated:
        return module.act_fn(h)
    own = getattr(module, "_apply_gate", None)
    if own is not None:
        return own(h)
    gate, up = h.chunk(2, dim=-1)
    return module.act_fn(gate) * up


@torch.no_grad()
def check_forward(module: nn.Module, layout: ExpertsLayout, name: str, tokens: int = 16) -> None:
    """ExpertsLayoutError unless `expert_loop` reproduces the module's own forward on random routed tokens.

    Skipped where the weights are not materialised (meta tensors, ZeRO-3 partitions): the layout was read from
    the class's flags, which the same class passed on a materialised copy.
    """
    w = getattr(module, layout.up)
    if w.is_meta or w.numel() == 0:
        return
    # transformers' grouped kernels take no float64: a float64 module is probed in float32 (a copy of its tensors)
    dtype = torch.float32 if w.dtype == torch.float64 else w.dtype
    tensors = {n: t.detach().to(dtype) for n, t in module.named_parameters(recurse=False)}
    gen = torch.Generator().manual_seed(0)
    e, k = layout.num_experts, min(2, layout.num_experts)
    hidden = (w.shape[1] if layout.transposed else w.shape[2])
    x = torch.randn(tokens, hidden, generator=gen).to(w.device, dtype)
    index = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(tokens)]).to(w.device)
    routing = torch.rand(tokens, k, generator=gen).to(w.device, dtype)
    try:
        own = torch.func.functional_call(module, tensors, (x, index, routing))
    except Exception as err:  # noqa: BLE001 - any failure means the calling convention is not the one we know
        raise ExpertsLayoutError(
            f"{name}.{layout.up}: {type(module).__name__}.forward(hidden_states, top_k_index, top_k_weights) failed "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); distqat cannot reproduce it: "
            f"keep it full precision on purpose with quant.exclude=['{name}']"
        ) from None
    weights = {p: (tensors[p].transpose(1, 2) if layout.transposed else tensors[p]) for p in layout.params}
    try:
        ours = expert_loop(module, x, index, routing, weights, layout=layout)
    except Exception as err:  # noqa: BLE001 - shapes or gates other than the flags say: not a layout we know
        raise ExpertsLayoutError(
            f"{name}.{layout.up}: distqat's experts loop fails on {type(module).__name__} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); keep it full precision on purpose with "
            f"quant.exclude=['{name}']") from None
    scale = own.float().abs().max().clamp_min(1e-6)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if own.shape != ours.shape or float((own.float() - ours.float()).abs().max() / scale) > tol:
        raise ExpertsLayoutError(
            f"{name}.{layout.up}: {type(module).__name__} computes something other than the transformers experts "
            f"layout its flags describe, so distqat cannot fake-quantize it; keep it full precision on purpose "
            f"with quant.exclude=['{name}']"
        )


_CLASSES: dict[type, type] = {}


def _quant_class(own: type) -> type:
    """One QuantExperts subclass per experts class, cached so every layer shares it."""
    if own not in _CLASSES:
        _CLASSES[own] = type(f"Quant{own.__name__}", (QuantExperts, own), {"_own_class": own})
    return _CLASSES[own]


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module that holds fused expert parameters (a direct 3-D parameter), by name."""
    return [(n, m) for n, m in model.named_modules() if fused_params(m)]


def routing_load(model: nn.Module, reset: bool = True) -> dict[str, list[int]]:
    """Tokens routed to each expert of each fake-quantized experts module since the last reset."""
    out: dict[str, list[int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantExperts):
            out[name] = m.routed_tokens.tolist()
            if reset:
                m.routed_tokens.zero_()
    return out


__all__ = ["QuantExperts", "ExpertsLayout", "ExpertsLayoutError", "describe", "expert_loop", "experts_modules",
           "fused_params", "routing_load", "check_forward", "activate", "routes"]

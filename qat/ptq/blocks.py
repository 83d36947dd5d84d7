"""The blocks the PTQ loop walks: the decoder's layout (which linears share an input, and what precedes
them), capturing layer 0's inputs, running a layer with hooks that collect its linears' input
statistics, and folding per-channel scales into the op before a group (SmoothQuant, AWQ).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..experts import describe, experts_modules
from ..linear import QuantLinear
from ..online import turns_input
from .gram import add_upper_gram, symmetrize

# Llama-family decoder layer: (module before the group, its kind, the linears sharing one input).
LLAMA_GROUPS = [
    ("input_layernorm", "norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("self_attn.v_proj", "linear", ["self_attn.o_proj"]),
    ("post_attention_layernorm", "norm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("mlp.up_proj", "linear", ["mlp.down_proj"]),
]


class _Stop(Exception):
    """Raised from a hook to cut a forward short once the wanted inputs are seen."""


@dataclass
class Stats:
    """Input statistics of one group of linears sharing an input (accumulated over calibration tokens)."""

    n: int = 0
    h: Optional[torch.Tensor] = None  # sum x x^T, then / n
    abs_sum: Optional[torch.Tensor] = None
    absmax: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor, want_h: bool) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.abs_sum is None:
            c = x.shape[-1]
            self.abs_sum = torch.zeros(c, device=x.device)
            self.absmax = torch.zeros(c, device=x.device)
            if want_h:
                self.h = torch.zeros(c, c, device=x.device)
        self.n += x.shape[0]
        self.abs_sum += x.abs().sum(0)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        if want_h:
            add_upper_gram(self.h, x)

    def finish(self) -> Stats:
        if self.h is not None:
            symmetrize(self.h).div_(max(self.n, 1))
        return self

    @property
    def absmean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)

    def rescale(self, s: torch.Tensor) -> None:
        """The inputs were divided by s channel-wise: update the statistics to match."""
        s = s.to(self.abs_sum.device).float()
        self.abs_sum /= s
        self.absmax /= s
        if self.h is not None:
            self.h /= s[:, None] * s[None, :]


@dataclass
class Routed:
    """A fused experts module's calibration inputs: every token that reached it, and the experts each was routed to."""

    x: torch.Tensor  # (tokens, hidden)
    index: torch.Tensor  # (tokens, top_k)

    def tokens(self, e: int) -> torch.Tensor:
        return self.x[(self.index == e).any(-1)]

    def counts(self, num_experts: int) -> list[int]:
        flat = self.index.reshape(-1)
        return torch.bincount(flat[flat < num_experts], minlength=num_experts).tolist()


@dataclass
class Group:
    """Linears sharing an input, and the op before them. In an MoE layer the norm's group also holds the fused
    experts modules reading its output (`experts`, their up weights' columns fold with the linears'), and a group of
    kind "experts" (no linears) stands for each expert's up -> down; `routed` holds their calibration inputs."""

    prev_name: Optional[str]
    prev_kind: Optional[str]
    names: list[str]
    stats: Optional[Stats] = None
    experts: list[str] = field(default_factory=list)
    routed: dict[str, Routed] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Model layout.


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(
            f"ptq runs block by block over model.model.layers (Llama-family layout); "
            f"{type(model).__name__} has no such list of decoder layers"
        )
    return layers


def outside_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of model.model that are not the decoder layers (embeddings, rotary table, final norm): what runs
    before layer 0 has to sit on the block loop's device while layer 0's inputs are captured."""
    layers = decoder_layers(model)
    return [c for c in model.model.children() if c is not layers]


def is_llama_layout(layer: nn.Module, mlp: bool = True) -> bool:
    """Whether the layer has the Llama layout's modules (`mlp=False`: its attention and norms only)."""
    names = {n for n, _ in layer.named_modules()}
    need = {p for prev, _, group in LLAMA_GROUPS for p in [prev, *group] if mlp or not p.startswith("mlp.")}
    return need <= names


def has_experts(layer: nn.Module) -> bool:
    """Whether the layer's MLP holds fused MoE experts (a module with 3-D expert parameters)."""
    mlp = getattr(layer, "mlp", None)
    return mlp is not None and bool(experts_modules(mlp))


def check_foldable(model: nn.Module, method: str, what: str = "scales", experts: bool = False) -> None:
    """AWQ/SmoothQuant fold scales (rotate: rotations) into RMSNorm weights and the linears they feed: only
    y = w * x_hat norms and the Llama layout (`experts`: or its attention and norms before a fused-experts MLP)."""
    mtype = getattr(getattr(model, "config", None), "model_type", "") or ""
    if mtype.startswith("gemma"):
        raise ValueError(
            f"ptq.method={method}: {mtype}'s RMSNorm computes (1 + weight) * x_hat, so {what} cannot be folded "
            "into it here; use rtn, gptq or hqq"
        )
    for layer in decoder_layers(model) if experts else decoder_layers(model)[:1]:
        if not (is_llama_layout(layer) or experts and is_llama_layout(layer, mlp=False) and has_experts(layer)):
            moe = " or fused MoE experts under mlp" if experts else ""
            raise ValueError(
                f"ptq.method={method} folds {what} into norms/linears of the Llama layout "
                f"(self_attn.{{q,k,v,o}}_proj, mlp.{{gate,up,down}}_proj{moe}, input_layernorm, "
                f"post_attention_layernorm); {type(layer).__name__} does not have it"
            )


def block_groups(layer: nn.Module) -> list[Group]:
    if is_llama_layout(layer):
        # With R4 down_proj reads (act * up) H: a scale folded into up_proj's rows would not scale its input.
        turned = turns_input(layer.get_submodule("mlp.down_proj")) is not None
        return [Group(None, None, list(names)) if turned and p == "mlp.up_proj" else Group(p, k, list(names))
                for p, k, names in LLAMA_GROUPS]
    if is_llama_layout(layer, mlp=False) and has_experts(layer):
        return [Group(p, k, list(names)) for p, k, names in LLAMA_GROUPS[:2]] + moe_groups(layer)
    # Other layouts: each linear alone, in registration order (no folding transforms).
    return [Group(None, None, [n]) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]


def moe_groups(layer: nn.Module) -> list[Group]:
    """An MoE MLP's groups: after post_attention_layernorm the router(s), shared experts' gate/up and gates, and the
    fused experts; each fused experts module's up -> down; each shared expert's up_proj -> down_proj."""
    experts = [f"mlp.{n}" for n, _ in experts_modules(layer.mlp)]
    inside = [e + "." for e in experts]
    hidden = layer.post_attention_layernorm.weight.shape[-1]
    readers, downs = [], []
    for n, m in layer.named_modules(prefix=""):
        if not n.startswith("mlp.") or n in experts or n.startswith(tuple(inside)):
            continue
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) and n.endswith(".down_proj"):
            downs.append(n)
        elif isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[-1] == hidden:
            readers.append(n)
    groups = [Group("post_attention_layernorm", "norm", readers, experts=experts)]
    groups += [Group(e, "experts", [], experts=[e]) for e in experts]
    names = {n for n, _ in layer.named_modules()}
    return groups + [Group(d[: -len("down_proj")] + "up_proj", "linear", [d]) for d in downs
                     if d[: -len("down_proj")] + "up_proj" in names]


# ---------------------------------------------------------------------------------------------
# Running a block.


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_inputs(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device):
    """Inputs (hidden states) and call kwargs of decoder layer 0 for each calibration batch."""
    layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def hook(mod, args, kw):
        if len(args) > 1:  # replayed without them, every layer would get layer 0's or none (Gemma 4's per-layer input)
            raise ValueError(f"ptq replays each decoder layer on inputs captured at layer 0; {type(mod).__name__} is "
                             f"called with {len(args) - 1} more positional input(s) of its own, which the block loop "
                             "(calibrated PTQ, train.blockwise) cannot replay; use ptq.method=rtn")
        x = args[0] if args else kw.pop("hidden_states")
        kw = dict(kw)
        kw.pop("hidden_states", None)
        inputs.append(x.detach())
        kwargs.append(kw)
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b0 in range(0, ids.shape[0], batch_size):
            try:
                model(ids[b0 : b0 + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


@torch.no_grad()
def run_block(layer: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    return [_hidden(layer(x, **kw)) for x, kw in zip(inputs, kwargs)]


@torch.no_grad()
def collect(layer: nn.Module, groups: list[Group], inputs, kwargs, want_h: bool, stop_early: bool = False) -> None:
    """Run the layer over the calibration inputs; each group's stats from its first linear's input.

    stop_early: cut each forward once every group's input has been seen (true-sequential GPTQ).
    """
    seen: set[int] = set()
    handles = []
    for gi, g in enumerate(groups):
        g.stats = Stats()
        if not g.names:  # an experts group: its inputs are the routed tokens (capture_routed)
            seen.add(gi)
            continue
        mod = layer.get_submodule(g.names[0])

        def hook(m, args, gi=gi, g=g):
            g.stats.add(args[0], want_h)
            seen.add(gi)
            if stop_early and len(seen) == len(groups):
                raise _Stop

        handles.append(mod.register_forward_pre_hook(hook))
    _replay(layer, inputs, kwargs, seen, handles)
    for g in groups:
        g.stats.finish()


def _replay(layer: nn.Module, inputs, kwargs, seen: set, handles: list) -> None:
    """Run the layer over the calibration batches (each cut short where a hook raises _Stop), then remove the
    hooks."""
    try:
        for x, kw in zip(inputs, kwargs):
            seen.clear()
            try:
                layer(x, **kw)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()


def capture_routed(layer: nn.Module, names: list[str], inputs, kwargs) -> dict[str, Routed]:
    """Each named experts module's inputs over the calibration batches, the layer cut short after the last one."""
    out = {}
    for n, calls in capture_calls(layer, names, inputs, kwargs).items():
        xs = [c[0].reshape(-1, c[0].shape[-1]) for c in calls]
        out[n] = Routed(torch.cat(xs), torch.cat([c[1].reshape(x.shape[0], -1) for c, x in zip(calls, xs)]))
    return out


@torch.no_grad()
def capture_calls(layer: nn.Module, names: list[str], inputs, kwargs) -> dict[str, list[tuple]]:
    """The positional arguments each named submodule is called with, per calibration batch, detached; each forward
    stops once every named submodule has been called (a fused experts module's hidden states and routing)."""
    calls: dict[str, list[tuple]] = {n: [] for n in names}
    seen: set[str] = set()
    handles = []
    for n in names:

        def hook(m, args, kw, n=n):
            args = tuple(args) + tuple(kw.values())
            calls[n].append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
            seen.add(n)
            if len(seen) == len(names):
                raise _Stop

        handles.append(layer.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True))
    _replay(layer, inputs, kwargs, seen, handles)
    return calls


@contextmanager
def quantizers_off(mods: dict[str, QuantLinear]):
    """Run these QuantLinears in full precision; `on(name)` switches one back (it stays on after). A static
    activation quantizer stays off until the end: its scale is calibrated on the finished block."""
    saved = {n: (m.weight_quantizer, m.input_quantizer) for n, m in mods.items()}
    later: dict[str, Any] = {}
    for m in mods.values():
        m.weight_quantizer, m.input_quantizer = None, None

    def on(name: str) -> None:
        if name in saved:
            w, a = saved.pop(name)
            mods[name].weight_quantizer = w
            if a is not None and not a.spec.dynamic:
                later[name] = a
            else:
                mods[name].input_quantizer = a

    try:
        yield on
    finally:
        for n in list(saved):
            on(n)
        for n, a in later.items():
            mods[n].input_quantizer = a


@torch.no_grad()
def fold(layer: nn.Module, group: Group, s: torch.Tensor) -> None:
    """Multiply the group's weight columns by s, divide the preceding op's output by s (exact in fp)."""
    prev = layer.get_submodule(group.prev_name)
    if group.prev_kind == "norm":
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias))
        prev.weight.div_(s.to(prev.weight))
    else:
        prev.weight.div_(s.to(prev.weight)[:, None])
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias))
    for n in group.names:
        lin = layer.get_submodule(n)
        lin.weight.mul_(s.to(lin.weight)[None, :])
    for n in group.experts:
        up = experts_weight(layer.get_submodule(n), "up")
        up.mul_(s.to(up)[None, None, :])
        if n in group.routed:
            group.routed[n].x = group.routed[n].x / s.to(group.routed[n].x)
    if group.stats is not None:
        group.stats.rescale(s)


def experts_weight(module: nn.Module, which: str) -> torch.Tensor:
    """A fused experts module's up or down weight as an (E, out, in) view (writes reach the parameter), wrapped in
    QuantExperts or not."""
    lay = getattr(module, "expert_layout", None) or describe(module, type(module).__name__)
    w = getattr(module, lay.up if which == "up" else lay.down)
    return w.transpose(1, 2) if lay.transposed else w


def foldable(layer: nn.Module, group: Group) -> bool:
    if group.prev_kind is None:
        return False
    if group.prev_kind == "linear":
        return layer.get_submodule(group.prev_name).out_features == layer.get_submodule(group.names[0]).in_features
    return True

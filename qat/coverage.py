"""How much of a model is quantized, measured rather than assumed, and the refusal when a weight is missed.

Every weight matrix a decoder computes with (>= 2-D parameters: linears and fused expert tensors) is sorted into a
kind: attention, dense MLP, experts, shared experts, other. Routers, norms and biases, embeddings and the head are
listed apart: they stay full precision by design. `measure` counts the elements of each kind that the model
fake-quantizes (a `QuantLinear` with a weight quantizer, or a parameter a `QuantExperts` quantizes); `check`
refuses, in one line naming the parameter and the fix, a decoder weight that stays full precision although no
include/exclude pattern or override kept it so on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from torch import nn
from torch.nn.modules.conv import _ConvNd

from .experts import QuantExperts, fused_params
from .linear import QuantLinear
from .quantizers import ActQuantizer, WeightQuantizer

KINDS = ("attention", "mlp", "experts", "shared_experts", "other")
# Parameters that are not matmul weights though 2-D: state-space models' decay and skip terms, attention sinks.
STATE_PARAMS = frozenset({"A_log", "A", "D", "dt_bias", "sinks"})
APART = ("router", "norm", "embedding")
_ATTENTION = ("attn", "attention")
_MLP = ("mlp", "feed_forward", "ffn", "moe")


class CoverageError(ValueError):
    """A decoder weight stays full precision without having been excluded on purpose."""


@dataclass
class Coverage:
    """Weight elements per kind: kind -> [quantized, total]; `apart`: elements kept full precision by design."""

    kinds: dict[str, list[int]] = field(default_factory=lambda: {k: [0, 0] for k in KINDS})
    apart: dict[str, int] = field(default_factory=lambda: {k: 0 for k in APART})
    full_precision: list[str] = field(default_factory=list)  # decoder weights left unquantized, by name

    @property
    def quantized(self) -> int:
        return sum(q for q, _ in self.kinds.values())

    @property
    def total(self) -> int:
        return sum(t for _, t in self.kinds.values())

    @property
    def share(self) -> float:
        """Quantized share of the decoder's weight elements (routers, norms, embeddings aside)."""
        return self.quantized / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "share": round(self.share, 6), "quantized_elements": self.quantized, "weight_elements": self.total,
            "kinds": {k: {"quantized": q, "total": t, "share": round(q / t, 6) if t else None}
                      for k, (q, t) in self.kinds.items() if t},
            "full_precision_apart": {k: n for k, n in self.apart.items() if n},
            "full_precision_weights": self.full_precision,
        }

    def __str__(self) -> str:
        parts = ", ".join(f"{k.replace('_', ' ')} {q / t:.1%}" for k, (q, t) in self.kinds.items() if t)
        apart = ", ".join(f"{k}s {_count(n)}" for k, n in self.apart.items() if n)
        return (f"coverage: {self.share:.2%} of {_count(self.total)} decoder weight elements quantized ({parts}); "
                f"full precision by design: {apart or 'nothing'}")


def _count(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def routers(model: nn.Module) -> set[str]:
    """Names of the modules that hold router weights. Beside each experts module, a child named like a router
    (`gate`, `router`, `shared_expert_gate`, `wg` ..., not `*_proj`) is one, with everything under it (a router
    may be a linear inside a wrapper, or a small MLP); so is any other child whose weight has one row per expert
    (or one row)."""
    out: set[str] = set()
    for name, parent in model.named_modules():
        children = dict(parent.named_children())
        # the experts: a child named so, or children holding fused expert tensors (JetMoE's input/output_linear)
        held = [c for c, m in children.items() if c == "experts" or fused_params(m)]
        if not held:
            continue
        n_experts = _n_experts(children[held[0]])
        for child_name, child in children.items():
            low = child_name.lower()
            if child_name in held or ("shared" in low and "gate" not in low):
                continue
            w = getattr(child, "weight", None)
            by_shape = isinstance(w, nn.Parameter) and w.dim() == 2 and w.shape[0] in (n_experts, 1)
            if not (by_shape or _router_name(low)):
                continue
            prefix = f"{name}.{child_name}" if name else child_name
            out |= {f"{prefix}.{n}" if n else prefix for n, m in child.named_modules()
                    if any(True for _ in m.parameters(recurse=False))}
    return out


def _router_name(low: str) -> bool:
    # "gate_proj" beside the experts would be a shared expert's linear, not a router
    return not low.endswith("_proj") and (low in ("gate", "wg", "gating", "shared_expert_gate") or "router" in low)


def _n_experts(experts: nn.Module) -> int:
    fused = fused_params(experts)
    if fused:
        return getattr(experts, fused[0]).shape[0]
    return len(experts) if isinstance(experts, (nn.ModuleList, nn.ModuleDict)) else -1


def _kind(name: str, owner: nn.Module) -> str:
    parts = name.lower().split(".")
    if fused_params(owner):
        return "experts"
    if any("shared_expert" in p or "shared_mlp" in p for p in parts):
        return "shared_experts"
    if ".experts." in f".{name}.":
        return "experts"  # experts held as a list of linears
    if any(a in p for p in parts for a in _ATTENTION):
        return "attention"
    if any(m in p for p in parts for m in _MLP):
        return "mlp"
    return "other"


def measure(model: nn.Module) -> Coverage:
    """The model's coverage as it stands (a fake-quantized model, or a plain one: 0%)."""
    cov = Coverage()
    router_names = routers(model)
    heads = {id(m) for m in (_get(model, "get_input_embeddings"), _get(model, "get_output_embeddings")) if m}
    seen: set[int] = set()
    for mname, module in model.named_modules():
        if isinstance(module, (WeightQuantizer, ActQuantizer)):
            continue  # a quantizer's own scales and clipping logits, not a weight
        quantized = _quantized(module)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied weights count once
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            n = p.numel() if not p.is_meta else _numel(p)
            if isinstance(module, nn.Embedding) or id(module) in heads:
                cov.apart["embedding"] += n
            elif p.dim() < 2 or pname.endswith("bias") or pname in STATE_PARAMS or isinstance(module, _ConvNd):
                cov.apart["norm"] += n
            elif mname in router_names:
                cov.apart["router"] += n
            else:
                kind = _kind(full, module)
                cov.kinds[kind][1] += n
                if pname in quantized:
                    cov.kinds[kind][0] += n
                else:
                    cov.full_precision.append(full)
    return cov


def _numel(p: nn.Parameter) -> int:
    ds = getattr(p, "ds_numel", None)  # a ZeRO-3 partition reports its full size here
    return int(ds) if ds is not None else p.numel()


def _get(model: nn.Module, attr: str):
    fn = getattr(model, attr, None)
    try:
        return fn() if fn is not None else None
    except (NotImplementedError, AttributeError):
        return None


def _quantized(module: nn.Module) -> set[str]:
    if isinstance(module, QuantLinear):
        return {"weight"} if module.weight_quantizer is not None else set()
    if isinstance(module, QuantExperts):
        return set(module.quantized_params())
    return set()


def check(cov: Coverage, on_purpose: OnPurpose) -> None:
    """CoverageError naming the first decoder weight left full precision that no pattern excluded."""
    for full in cov.full_precision:
        module, _, param = full.rpartition(".")
        if on_purpose(module, param):
            continue
        raise CoverageError(
            f"{full} stays full precision: distqat has no fake-quant layer for {param!r} here, so the model would "
            f"not be what its quant config says; keep it full precision on purpose with "
            f"quant.exclude=['{module}'] (or a pattern such as '*.{module.rsplit('.', 1)[-1]}')"
        )


class OnPurpose:
    """Whether a module (or one of its parameters) is kept full precision by the spec's patterns."""

    def __init__(self, include: list[str], exclude: list[str], weightless: set[str]) -> None:
        self.include, self.exclude, self.weightless = include, exclude, weightless

    def __call__(self, module: str, param: str) -> bool:
        names = (module, f"{module}.{param}")
        if any(n in self.weightless for n in names):
            return True
        if not any(fnmatchcase(n, p) for n in names for p in self.include):
            return True
        return any(fnmatchcase(n, p) for n in names for p in self.exclude)


__all__ = ["Coverage", "CoverageError", "OnPurpose", "KINDS", "APART", "measure", "check", "routers"]

"""Model surgery: turn a Hugging Face causal LM into a fake-quantized one (tensors in, modules out; the
folder a quantized model is saved in is read by `qat.io.folders`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Optional, Union

import torch
from torch import nn

from . import kv as kv_quant
from . import online
from .coverage import Coverage, CoverageError, OnPurpose, check, measure, routers
from .experts import ExpertsLayoutError, QuantExperts, describe, experts_modules
from .keys import COVERAGE_KEY, QUANT_KEY, SOURCE_KEY
from .linear import ClearShared, QuantLinear, SharedInput
from .quantizers import ActQuantizer, WeightQuantizer
from .spec import QuantSpec, TensorSpec, check_layer, parse, resolve_for_layer


@dataclass
class QuantReport:
    """What quantize_model changed: one row per replaced linear and per fake-quantized experts module, the layers
    left alone, and the coverage measured on the result."""

    replaced: list[tuple[str, int, int, str]] = field(default_factory=list)  # name, in, out, scheme
    skipped: list[str] = field(default_factory=list)
    kv_modules: list[str] = field(default_factory=list)
    experts: list[tuple[str, int, str]] = field(default_factory=list)  # name, number of experts, scheme
    coverage: Optional[Coverage] = None
    source: Optional[dict] = None  # the stored format the model's weights came in (qat.io.models.stored_format)

    def __str__(self) -> str:
        by_scheme: dict[str, int] = {}
        for *_, s in self.replaced:
            by_scheme[s] = by_scheme.get(s, 0) + 1
        lines = [f"quantized {len(self.replaced)} linear layers: "
                 + ", ".join(f"{n} x {s}" for s, n in sorted(by_scheme.items()))]
        if self.experts:
            n = sum(e for _, e, _ in self.experts)
            lines.append(f"quantized {len(self.experts)} fused experts modules ({n} experts): "
                         + ", ".join(sorted({s for *_, s in self.experts})))
        if self.skipped:
            lines.append(f"left in full precision: {', '.join(self.skipped)}")
        if self.kv_modules:
            lines.append(f"KV cache fake-quantized in {len(self.kv_modules)} attention modules")
        if self.coverage is not None:
            lines.append(str(self.coverage))
        if self.source:
            lines.append(f"source: the model's {self.source['weights']} came in {self.source['format'].upper()} "
                         f"({self.source['read']})")
        return "\n".join(lines)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _layer_label(w: Optional[TensorSpec], a: Optional[TensorSpec]) -> str:
    try:
        return QuantSpec(weight=w, activation=a).name if w is not None else "a-only"
    except ValueError:
        return "custom"


def quantize_model(
    model: nn.Module,
    spec: Union[QuantSpec, str],
    include: Optional[list[str]] = None,
    exclude: Optional[list[str]] = None,
    overrides: Optional[dict[str, str]] = None,
) -> QuantReport:
    """Replace the model's linears by QuantLinear in place and install KV-cache fake quant.

    include/exclude are fnmatch patterns over module names (default: every linear but lm_head);
    overrides maps patterns to short names for mixed precision. The spec is recorded in
    model.config (so in config.json), from which `qat.load.load` rebuilds the same model.
    """
    if isinstance(spec, str):
        spec = parse(spec)
    spec = replace(
        spec,
        include=include if include is not None else spec.include,
        exclude=exclude if exclude is not None else spec.exclude,
        overrides=overrides if overrides is not None else spec.overrides,
        scheme=None,
    ).check()
    if getattr(getattr(model, "config", None), QUANT_KEY, None):
        raise ValueError(f"this model is quantized already (config has {QUANT_KEY}); load the original model")
    report = QuantReport()
    router_names = routers(model)
    weightless: set[str] = set()  # layers an override or the router rule keeps full precision on purpose
    # A Linear subclass with a forward of its own (a block-diagonal linear, say) computes something QuantLinear
    # would not: left alone, and so refused by the coverage check unless excluded.
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward]
    for name, linear in targets:
        if not _matches(name, spec.include) or _matches(name, spec.exclude):
            report.skipped.append(name)
            continue
        if name in router_names and not spec.routers:
            report.skipped.append(name)
            weightless.add(name)
            continue
        layer = resolve_for_layer(spec, name)
        if layer.weight is None and layer.activation is None:
            report.skipped.append(name)
            weightless.add(name)
            continue
        if layer.weight is None:
            weightless.add(name)
        check_layer(layer.weight, linear.in_features, name, layer.activation)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(linear, layer.weight, layer.activation))
        report.replaced.append((name, linear.in_features, linear.out_features,
                                _layer_label(layer.weight, layer.activation)))
    _quantize_experts(model, spec, report, weightless)
    if spec.routers:
        raw = sorted(n for n in router_names if not isinstance(model.get_submodule(n), nn.Linear))
        if raw:
            raise CoverageError(f"{raw[0]}.weight: quant.routers=true quantizes routers held as nn.Linear, and this "
                                "router is a bare parameter; set quant.routers=false (routers stay full precision)")
    share_inputs(model)
    if spec.kv is not None:
        report.kv_modules = kv_quant.install(model, spec.kv)
    online.reinstall(model)  # R4's hooks sat on the Linears just replaced
    report.coverage = measure(model)
    report.source = getattr(getattr(model, "config", None), SOURCE_KEY, None)
    if spec.weight is not None or any(ov.startswith("w") for ov in spec.overrides.values()):
        check(report.coverage, OnPurpose(spec.include, spec.exclude, weightless | set(router_names)))
    if not report.replaced and not report.kv_modules and not report.experts:
        raise ValueError(
            f"no layer of {type(model).__name__} matched quant.include={spec.include} "
            f"(exclude={spec.exclude}); nothing was quantized"
        )
    if hasattr(model, "config"):
        setattr(model.config, QUANT_KEY, spec.to_dict())
        source = {"source": report.source} if report.source else {}
        setattr(model.config, COVERAGE_KEY, {**report.coverage.to_dict(), **source})
    return report


def _quantize_experts(model: nn.Module, spec: QuantSpec, report: QuantReport, weightless: set[str]) -> None:
    """Wrap every fused experts module the patterns select in QuantExperts, one spec per stacked parameter
    (overrides and excludes match `<module>.<parameter>`, e.g. '*.experts.down_proj', as well as the module)."""
    for name, module in experts_modules(model):
        if isinstance(module, QuantExperts) or not _matches(name, spec.include) or _matches(name, spec.exclude):
            report.skipped.append(name)
            continue
        try:
            layout = describe(module, name)
        except ExpertsLayoutError as e:
            raise CoverageError(str(e)) from None
        specs = {}
        labels = set()
        for param in layout.params:
            full = f"{name}.{param}"
            if _matches(full, spec.exclude):
                weightless.add(full)
                continue
            layer = resolve_for_layer(spec, full)
            if layer.weight is None:
                weightless.add(full)
            w = getattr(module, param)
            check_layer(layer.weight, w.shape[1] if layout.transposed else w.shape[2], full, layer.activation)
            specs[param] = (layer.weight, layer.activation)
            labels.add(_layer_label(layer.weight, layer.activation))
        try:
            QuantExperts.wrap(module, specs, name)
        except ExpertsLayoutError as e:
            raise CoverageError(str(e)) from None
        report.experts.append((name, layout.num_experts, "+".join(sorted(labels))))


def share_inputs(model: nn.Module) -> SharedInput:
    """Give the dynamic input quantizers of the model's QuantLinears one SharedInput, cleared after
    every forward of the model: linears that read the same tensor then quantize it once."""
    memo = SharedInput()
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.input_quantizer is not None and m.input_quantizer.spec.dynamic:
            m.input_quantizer.shared = memo
    model.register_forward_hook(ClearShared(memo))
    return memo


def coverage_of(model: nn.Module) -> Optional[dict]:
    """The coverage a quantized model records (its config's, written when it was quantized; an integer model keeps
    it through convert), else measured on the model as it is."""
    recorded = getattr(getattr(model, "config", None), COVERAGE_KEY, None)
    return recorded if recorded else measure(model).to_dict()


def quant_spec_of(model: nn.Module) -> Optional[QuantSpec]:
    d = getattr(getattr(model, "config", None), QUANT_KEY, None)
    return QuantSpec.from_dict(d) if d else None


def quantizer_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the model's quantizer tensors (scales, clipping logits, static ranges)."""
    keys: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, (WeightQuantizer, ActQuantizer)):
            keys |= {f"{name}.{k}" if name else k for k in m.state_dict()}
    return keys


@contextmanager
def calibrate(model: nn.Module) -> Iterator[None]:
    """Observe static activation ranges inside the block, fix the scales at its end:

        with calibrate(model):
            for batch in batches: model(batch)
    """
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer) and not m.spec.dynamic]
    for q in quantizers:
        q.absmax.zero_()
        q.observing = True
    try:
        with torch.no_grad():
            yield
    finally:
        for q in quantizers:
            q.finish_calibration()

"""One calibration loop for every PTQ method: the model runs block by block.

The inputs of decoder layer 0 are captured once (with the kwargs the model passes it: position
embeddings, mask ...); then for each layer: input statistics of its linears are collected while
the full-precision layer runs over all calibration inputs, the method's transforms (SmoothQuant, AWQ)
are folded in, its rounding (RTN, GPTQ, HQQ) puts the linears on the grid and freezes them (then the layer's
fused MoE experts, each expert on the tokens routed to it: `moe.py`), and the quantized layer's outputs become
the next layer's inputs. Only the layer being processed (and the
calibration activations) need to sit on the device, so a model much larger than GPU memory quantizes
with one block resident.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, is_dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .. import kv as kv_quant
from ..apply import quantize_model
from ..experts import experts_modules
from ..io.signals import Stopped, stop_at_boundaries
from ..keys import LLM_INT8_KEY, PTQ_KEY, QUANT_KEY
from ..linear import QuantLinear
from ..quantizers import ActQuantizer
from ..spec import QuantSpec
from .blocks import (
    block_groups,
    capture_inputs,
    capture_routed,
    check_foldable,
    collect,
    decoder_layers,
    has_experts,
    is_llama_layout,
    outside_layers,
    quantizers_off,
    run_block,
)
from .config import PTQConfig
from .grid import freeze_rtn, frozen_spec
from .moe import check_folds, experts_off, freeze_rtn_experts, quantized_experts, round_experts
from .parts import Baseline, ModelTransform, Part, PTQReport, Rounding, Transform
from .progress import BlockProgress, fingerprint
from .registry import PARTS, build, parse_method
from .settled import BlockReuse


def _parts(spec: QuantSpec, cfg: PTQConfig) -> list[Part]:
    """The method's parts, after each has checked the spec (one-line ValueErrors, before any work)."""
    parts = build(parse_method(cfg.method), cfg)
    if not isinstance(parts[0], Baseline) and spec.weight is None:
        raise ValueError(f"ptq.method={'+'.join(p.name for p in parts)} quantizes weights; quant.weight is null")
    for part in parts:
        part.check(spec)
    if not isinstance(parts[0], Baseline):
        frozen_spec(spec)
    return parts


def _calibrates(spec: QuantSpec, parts: list[Part]) -> bool:
    static_act = spec.activation is not None and not spec.activation.dynamic
    return not isinstance(parts[0], Baseline) and (any(p.needs_calibration for p in parts) or static_act)


def check(spec: QuantSpec, cfg: PTQConfig) -> list[str]:
    """The method's steps, or a one-line ValueError for a method or spec it cannot produce (before any work)."""
    return [p.name for p in _parts(spec, cfg)]


def needs_calibration(spec: QuantSpec, cfg: PTQConfig) -> bool:
    """Whether the method (or a static activation scale) needs calibration token ids."""
    return _calibrates(spec, _parts(spec, cfg))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("ptq.device=cuda but no CUDA GPU is available; use ptq.device=auto or cpu")
    return torch.device(name)


@torch.no_grad()
def run_ptq(
    model: nn.Module, spec: QuantSpec, cfg: PTQConfig, calib_ids: Optional[torch.Tensor] = None,
    progress_dir: Optional[Path] = None,
) -> tuple[nn.Module, PTQReport]:
    """Quantize `model` in place with `cfg.method`; returns (model, PTQReport).

    calib_ids (n, seq_len) are the calibration token ids, needed when `needs_calibration(spec, cfg)`.
    Every method but a baseline leaves the model as `qat.apply.quantize_model` does (QuantLinear layers)
    with the weights on the PTQ grid and its scales/zeros frozen in lsq weight quantizers.
    progress_dir: where a stop signal keeps the finished blocks (`progress.py`), and where a rerun finds them.
    """
    parts = _parts(spec, cfg)
    if getattr(model.config, QUANT_KEY, None) or getattr(model.config, LLM_INT8_KEY, None):
        raise ValueError("this model is quantized already; load the original model")
    name = "+".join(p.name for p in parts)
    _check_experts(model, parts, name)
    if isinstance(parts[0], Baseline):
        return parts[0].quantize(model, spec)
    turns = [p for p in parts if isinstance(p, ModelTransform)]
    *transforms, rounding = [p for p in parts if not isinstance(p, ModelTransform)]
    if transforms:
        check_foldable(model, name, experts=all(t.handles_experts for t in transforms))
    needs_data = _calibrates(spec, parts)
    if needs_data and calib_ids is None:
        raise ValueError(f"ptq.method={name} needs calibration token ids (calib_ids)")
    layers = decoder_layers(model)
    progress = None
    if progress_dir is not None and rounding.resumable:  # before any transform changes the weights it hashes
        progress = BlockProgress(progress_dir, fingerprint(model, spec, cfg, calib_ids, layers[0]))
    fspec = frozen_spec(spec)
    t_start = time.perf_counter()
    report = PTQReport(method=name, spec=_spec_label(spec))
    device = _device(cfg.device)
    home = next(model.parameters()).device
    record: dict[str, Any] = {"method": name}
    # Each part's settings travel with the folder, so a start says what made it: the pipeline names its PTQ row
    # from them (GPTQ with and without its clipping search differ by 4 points of perplexity on the bundled model).
    for part in transforms + [rounding]:
        settings = getattr(part, "cfg", None)
        if is_dataclass(settings):
            record[part.name] = asdict(settings)
    for turn in turns:
        t0 = time.perf_counter()
        record[turn.name] = report.extra[turn.name] = turn.apply_model(model, device)
        report.extra[turn.name]["seconds"] = time.perf_counter() - t0
    quantize_model(model, replace(fspec, kv=None))
    inputs = kwargs = None
    if needs_data:
        report.calib_tokens = int(calib_ids.numel())
        for child in outside_layers(model):
            child.to(device)
        inputs, kwargs = capture_inputs(model, calib_ids, cfg.batch_size, device)
        inputs = [x.to(device) for x in inputs]
        kwargs = [_to(kw, device) for kw in kwargs]

    start, inputs = _resume(progress, layers, inputs, device, report, name)
    with stop_at_boundaries() as stop:
        for i, layer in enumerate(layers[start:], start):
            t0 = time.perf_counter()
            layer.to(device)
            inputs = _quantize_block(layer, transforms, rounding, inputs, kwargs, report, f"model.layers.{i}.",
                                     outputs=needs_data and i + 1 < len(layers))
            layer.to(home)
            dt = time.perf_counter() - t0
            report.blocks.append({"index": i, "seconds": dt})
            if cfg.progress:
                print(f"ptq {name}: block {i + 1}/{len(layers)} {dt:.1f}s", file=sys.stderr, flush=True)
            if stop.signame is not None and i + 1 < len(layers):  # after the last block, finishing is quicker
                if progress is None:
                    raise Stopped(stop.signame, f"ptq.method={name} keeps no finished blocks; the rerun starts afresh")
                progress.save(layers[: i + 1], inputs, {"blocks": report.blocks, "layers": report.layers})
                raise Stopped(stop.signame, f"blocks 1-{i + 1} of {len(layers)} kept in {progress.path}; the same "
                                            f"command continues from block {i + 2}")
    model.to(home)
    # Quantized linears outside the decoder layers (lm_head when included): RTN.
    done = {d["name"] for d in report.layers}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.weight_quantizer is not None and n not in done:
            t0 = time.perf_counter()
            freeze_rtn(m)
            report.add(n, time.perf_counter() - t0, "rtn")
    for n, m in quantized_experts(model).items():
        if not any(d["name"].startswith(n + ".") for d in report.layers):
            t0 = time.perf_counter()
            freeze_rtn_experts(m)
            report.add(n, time.perf_counter() - t0, "rtn")
    rounding.finish(model, report)
    if spec.kv is not None:
        kv_quant.install(model, spec.kv)
    setattr(model.config, QUANT_KEY, fspec.to_dict())
    setattr(model.config, PTQ_KEY, {**record, "calib_tokens": report.calib_tokens})
    report.seconds = time.perf_counter() - t_start
    return model, report


def _resume(progress: Optional[BlockProgress], layers: list[nn.Module], inputs, device: torch.device,
            report: PTQReport, name: str) -> tuple[int, Any]:
    """(the first block to quantize, its inputs): after a stopped run of the same job, the blocks it finished."""
    saved = progress.load() if progress is not None else None
    if saved is None:
        return 0, inputs
    for layer, state in zip(layers, saved["blocks"]):
        layer.load_state_dict(state)
    report.blocks, report.layers = saved["report"]["blocks"], saved["report"]["layers"]
    start = len(saved["blocks"])
    print(f"ptq {name}: blocks 1-{start} of {len(layers)} as a stopped run left them ({progress.path})",
          file=sys.stderr, flush=True)
    return start, None if saved["inputs"] is None else [x.to(device) for x in saved["inputs"]]


def _quantize_block(layer: nn.Module, transforms: list[Transform], rounding: Rounding, inputs, kwargs,
                    report: PTQReport, prefix: str, outputs: bool) -> Optional[list[torch.Tensor]]:
    """Round the block's linears (and fused experts); with `outputs`, the quantized block's outputs (the next
    block's inputs)."""
    reuse = None
    if inputs is not None and rounding.sequential and is_llama_layout(layer, mlp=False):
        reuse = BlockReuse(layer, len(inputs))
    try:
        _round_block(layer, transforms, rounding, inputs, kwargs, report, prefix, reuse)
        statics = [m for m in layer.modules() if isinstance(m, ActQuantizer) and not m.spec.dynamic]
        if reuse is not None:
            reuse.close() if statics else reuse.final_pass()  # kept with static quantizers off: not the block's
        if statics and inputs is not None:
            for m in statics:
                m.absmax.zero_()
                m.observing = True
            run_block(layer, inputs, kwargs)
            for m in statics:
                m.finish_calibration()
        return run_block(layer, inputs, kwargs) if outputs else None
    finally:
        if reuse is not None:
            reuse.close()


def _round_block(layer: nn.Module, transforms: list[Transform], rounding: Rounding, inputs, kwargs,
                 report: PTQReport, prefix: str, reuse: Optional[BlockReuse]) -> None:
    qmods = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None}
    groups = block_groups(layer)
    specs = {n: m.weight_quantizer.spec for n, m in qmods.items()}
    need_h = any(p.needs_hessian for p in (*transforms, rounding))
    experts = quantized_experts(layer)
    especs = {f"{n}.{p}": q.spec for n, m in experts.items() for p, q in m.weight_quantizers.items()}
    # Static activation quantizers of this block are calibrated on the quantized block below.
    with quantizers_off(qmods) as on, experts_off(experts) as off:
        if inputs is not None and (transforms or rounding.needs_calibration):
            if rounding.sequential and not transforms:
                # Every later group is collected again once the ones before it are rounded (below), so only the
                # first group's inputs are needed here: the forward stops there, and the other groups' Hessians
                # are not accumulated twice (a third of a bundled-model GPTQ run's time; the same codes).
                collect(layer, groups[:1], inputs, kwargs, want_h=need_h, stop_early=True)
            else:
                collect(layer, groups, inputs, kwargs, want_h=need_h)
        if transforms and has_experts(layer) and inputs is not None:
            check_folds(layer, inputs[0], kwargs[0], "+".join(t.name for t in transforms))
        if transforms and experts:  # the full-precision block's routing; each fold rescales it
            routed = capture_routed(layer, list(experts), inputs, kwargs)
            for g in groups:
                g.routed = {n: routed[n] for n in g.experts if n in routed}
        for t in transforms:
            for g in groups:
                t0 = time.perf_counter()
                gspecs = {n: specs[n] for n in g.names if n in qmods}
                gspecs.update({k: v for k, v in especs.items() if k.rpartition(".")[0] in g.experts})
                changed = t.apply(layer, g, gspecs)
                _count(report, prefix, changed, time.perf_counter() - t0, t)
        routed = None
        if experts and rounding.needs_hessian and not rounding.sequential:  # the full-precision (folded) block's
            routed = capture_routed(layer, list(experts), inputs, kwargs)
        for gi, g in enumerate(groups):
            names = [n for n in g.names if n in qmods]
            if names and gi > 0 and rounding.sequential:
                keep = reuse.keep_down_inputs(names) if reuse is not None else None
                collect(layer, [g], inputs, kwargs, want_h=True, stop_early=True)
                if keep is not None:
                    keep.remove()
            if names and rounding.needs_hessian and (g.stats is None or not g.stats.n):
                raise ValueError(f"ptq.method={rounding.name}: {prefix}{names[0]} never ran on the calibration tokens "
                                 "(the model uses its weight without calling it), so it has no Hessian; keep it full "
                                 f"precision with quant.exclude=['*.{names[0].rsplit('.', 1)[-1]}'] or use rtn")
            for n in names:
                q = qmods[n]
                t0 = time.perf_counter()
                rounded = rounding.round(q.weight, specs[n], g.stats.h if g.stats is not None else None)
                on(n)
                rounding.freeze(layer, n, q, rounded)
                report.add(prefix + n, time.perf_counter() - t0, rounding.name)
            if reuse is not None:
                reuse.rounded(names)
        if experts and rounding.needs_hessian and routed is None:  # routed by the block rounded so far
            routed = capture_routed(layer, list(experts), inputs, kwargs)
        for n, m in experts.items():
            round_experts(n, m, off, rounding, None if routed is None else routed[n], report, prefix)


def _check_experts(model: nn.Module, parts: list[Part], name: str) -> None:
    """One-line ValueError when the model has fused MoE experts and a part of the method cannot quantize them."""
    moe = experts_modules(model)
    refused = [p.name for p in parts if not p.handles_experts]
    if moe and refused:
        ok = [n for n, c in PARTS.items() if c.handles_experts]
        raise ValueError(f"ptq.method={name}: {refused[0]} does not handle fused MoE experts ({moe[0][0]}); use a "
                         f"method made of {', '.join(ok)} (e.g. gptq or rotate+gptq)")


def _count(report: PTQReport, prefix: str, names: list[str], seconds: float, part: Part) -> None:
    for n in names:
        report.add(prefix + n, seconds / len(names), part.name)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _spec_label(spec: QuantSpec) -> str:
    try:
        return spec.name
    except ValueError:
        return "custom"

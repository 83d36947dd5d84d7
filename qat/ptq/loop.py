"""One calibration loop for every PTQ method: the model runs block by block.

The inputs of decoder layer 0 are captured once (with the kwargs the model passes it: position
embeddings, mask ...); then for each layer: input statistics of its linears are collected while
the full-precision layer runs over all calibration inputs, transforms (SmoothQuant, AWQ) are folded
in, the linears are rounded (RTN, GPTQ, HQQ) and frozen, and the quantized layer's outputs become
the next layer's inputs. Only the layer being processed (and the calibration activations) need to
sit on the device, so a model much larger than GPU memory quantizes with one block resident.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import nn

from ..apply import CONFIG_KEY, quantize_model
from ..linear import QuantLinear
from ..quantizers import ActQuantizer
from ..spec import QuantSpec, parse
from . import awq as awq_mod
from .blocks import (
    block_groups,
    capture_inputs,
    check_foldable,
    collect,
    decoder_layers,
    fold,
    foldable,
    quantizers_off,
    run_block,
)
from .config import PTQConfig, parse_method
from .gptq import gptq
from .grid import freeze, freeze_rtn, frozen_spec
from .hqq import hqq
from .smoothquant import smooth_scales

PTQ_KEY = "distqat_ptq"  # what ptq did, recorded in model.config next to the quant spec

@dataclass
class PTQReport:
    method: str
    spec: str
    blocks: list[dict] = field(default_factory=list)  # index, seconds
    layers: list[dict] = field(default_factory=list)  # name, seconds, algorithm
    calib_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"method": self.method, "spec": self.spec, "calib_tokens": self.calib_tokens,
                "seconds": self.seconds, "blocks": self.blocks, "layers": self.layers}


# ---------------------------------------------------------------------------------------------
# The loop.


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("ptq.device=cuda but no CUDA GPU is available; use ptq.device=auto or cpu")
    return torch.device(name)


def check_spec(spec: QuantSpec, steps: list[str]) -> None:
    """One-line errors for specs a method cannot produce."""
    name = "+".join(steps)
    if steps == ["llm_int8"]:
        return
    if spec.weight is None:
        raise ValueError(f"ptq.method={name} quantizes weights; quant.weight is null")
    w = spec.weight
    if "hqq" in steps:
        if spec.activation is not None or spec.kv is not None:
            raise ValueError(
                "ptq.method=hqq is weight-only and calibration-free; quant.activation and quant.kv must be null; "
                "use rtn or smoothquant+rtn for activations"
            )
        if w.format != "int":
            raise ValueError(f"ptq.method=hqq needs an integer weight grid, not quant.weight.format={w.format}")
    if "gptq" in steps and w.format == "fp8":
        raise ValueError("ptq.method=gptq rounds onto an integer or nf4 grid; fp8 weights take rtn")
    if "smoothquant" in steps and spec.activation is None:
        raise ValueError(
            "ptq.method=smoothquant migrates activation outliers for W8A8; the spec quantizes no activations "
            "(use quant.scheme=w8a8)"
        )


def needs_calibration(spec: QuantSpec, steps: list[str]) -> bool:
    """Whether the method (or a static activation scale) needs calibration text."""
    if steps == ["llm_int8"]:
        return False
    static_act = spec.activation is not None and not spec.activation.dynamic
    return bool(set(steps) & {"gptq", "awq", "smoothquant"}) or static_act


@torch.no_grad()
def run_ptq(cfg_like: Any, model: nn.Module, tokenizer=None, calib_ids: Optional[torch.Tensor] = None):
    """Quantize `model` in place with the PTQ method of `cfg_like`; returns (model, PTQReport).

    cfg_like: a RunConfig (with .quant, .ptq, .data) or a dict/namespace with `quant` (QuantSpec or short
    name) and `ptq` (PTQConfig). calib_ids (n, seq_len) replaces the calibration text when given.
    """
    spec, pcfg, data_path, text_field = _unpack(cfg_like)
    steps = parse_method(pcfg.method)
    name = "+".join(steps)
    check_spec(spec, steps)
    if getattr(getattr(model, "config", None), CONFIG_KEY, None) or getattr(model.config, PTQ_KEY, None):
        raise ValueError("this model is quantized already; load the original model")
    if steps == ["llm_int8"]:
        from .llm_int8 import convert_llm_int8

        t0 = time.perf_counter()
        names = convert_llm_int8(model, spec, pcfg.int8_threshold)
        report = PTQReport(method=name, spec="llm_int8", seconds=time.perf_counter() - t0)
        report.layers = [{"name": n, "seconds": 0.0, "algorithm": "llm_int8"} for n in names]
        return model, report
    if any(s in steps for s in ("awq", "smoothquant")):
        check_foldable(model, name)
    layers = decoder_layers(model)
    fspec = frozen_spec(spec)
    t_start = time.perf_counter()
    report = PTQReport(method=name, spec=_spec_label(spec))
    needs_data = needs_calibration(spec, steps)
    device = _device(pcfg.device)
    home = next(model.parameters()).device
    if needs_data and calib_ids is None:  # before any surgery: a too-small calibration set fails cleanly
        from .calib import calibration_ids, resolve_calib_path

        if tokenizer is None and pcfg.calib_data != "generate":
            raise ValueError("ptq needs a tokenizer (or calib_ids) to build the calibration set")
        calib_ids = calibration_ids(tokenizer, pcfg.n_samples, pcfg.seq_len,
                                    resolve_calib_path(pcfg.calib_data, data_path), pcfg.calib_split,
                                    text_field, model=model, seed=pcfg.seed)
    quantize_model(model, replace(fspec, kv=None))
    inputs = kwargs = None
    if needs_data:
        report.calib_tokens = int(calib_ids.numel())
        _move_outside_layers(model, device)
        inputs, kwargs = capture_inputs(model, calib_ids, pcfg.batch_size, device)
        inputs = [x.to(device) for x in inputs]
        kwargs = [_to(kw, device) for kw in kwargs]

    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        layer.to(device)
        _quantize_block(layer, steps, pcfg, inputs, kwargs, report, prefix=f"model.layers.{i}.")
        if needs_data and i + 1 < len(layers):
            inputs = run_block(layer, inputs, kwargs)
        layer.to(home)
        dt = time.perf_counter() - t0
        report.blocks.append({"index": i, "seconds": dt})
        if pcfg.progress:
            print(f"ptq {name}: block {i + 1}/{len(layers)} {dt:.1f}s", file=sys.stderr, flush=True)
    model.to(home)
    # Quantized linears outside the decoder layers (lm_head when included): RTN.
    done = {d["name"] for d in report.layers}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.weight_quantizer is not None and n not in done:
            t0 = time.perf_counter()
            freeze_rtn(m)
            report.layers.append({"name": n, "seconds": time.perf_counter() - t0, "algorithm": "rtn"})
    if spec.kv is not None:
        from .. import kv as kv_quant

        kv_quant.install(model, spec.kv)
    setattr(model.config, CONFIG_KEY, fspec.to_dict())
    setattr(model.config, PTQ_KEY, {"method": name, "calib_tokens": report.calib_tokens})
    report.seconds = time.perf_counter() - t_start
    return model, report


def _quantize_block(layer, steps, pcfg: PTQConfig, inputs, kwargs, report: PTQReport, prefix: str) -> None:
    qmods = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None}
    groups = block_groups(layer)
    wspec_of = {n: m.weight_quantizer.spec for n, m in qmods.items()}
    transforms = [s for s in steps if s in ("smoothquant", "awq")]
    rounder = steps[-1]
    need_h = "gptq" in steps or "awq" in steps
    # Static activation quantizers of this block are calibrated on the quantized block below.
    with quantizers_off(qmods) as on:
        if inputs is not None and (transforms or rounder == "gptq"):
            collect(layer, groups, inputs, kwargs, want_h=need_h)
        if "smoothquant" in transforms:
            for g in groups:
                if foldable(layer, g):
                    ws = [layer.get_submodule(n).weight for n in g.names]
                    fold(layer, g, smooth_scales(ws, g.stats.absmax, pcfg.smooth_alpha))
        if "awq" in transforms:
            for g in groups:
                qn = [n for n in g.names if n in qmods]
                if not qn:
                    continue
                t0 = time.perf_counter()
                spec = wspec_of[qn[0]]
                if foldable(layer, g):
                    ws = [layer.get_submodule(n).weight for n in qn]
                    s, _ = awq_mod.search_scale(ws, g.stats.h, g.stats.absmean, spec, pcfg.awq_grid,
                                                ws[0].dtype)
                    fold(layer, g, s)
                if pcfg.awq_clip:
                    for n in qn:
                        if n.endswith(("q_proj", "k_proj")):
                            continue
                        w = layer.get_submodule(n).weight
                        w.copy_(awq_mod.search_clip(w, g.stats.h, wspec_of[n], pcfg.awq_clip_grid,
                                                    pcfg.awq_max_shrink, w.dtype))
                dt = (time.perf_counter() - t0) / len(qn)
                for n in qn:
                    report.layers.append({"name": prefix + n, "seconds": dt, "algorithm": "awq"})
        for gi, g in enumerate(groups):
            qn = [n for n in g.names if n in qmods]
            if rounder == "gptq" and qn and gi > 0 and pcfg.true_sequential:
                collect(layer, [g], inputs, kwargs, want_h=True, stop_early=True)
            for n in qn:
                q = qmods[n]
                spec = wspec_of[n]
                t0 = time.perf_counter()
                if rounder == "gptq":
                    deq, _, s, z = gptq(q.weight, g.stats.h, spec, pcfg.damp, pcfg.block_size, pcfg.act_order,
                                        pcfg.static_groups, q.weight.dtype)
                elif rounder == "hqq":
                    deq, _, s, z = hqq(q.weight, spec, pcfg.hqq_iters, pcfg.hqq_lp_norm, pcfg.hqq_beta,
                                       pcfg.hqq_kappa, q.weight.dtype)
                else:
                    from .grid import rtn

                    deq, _, s, z = rtn(q.weight, spec, q.weight.dtype)
                on(n)
                freeze(q, deq, s, z)
                sec = time.perf_counter() - t0
                prev = next((d for d in report.layers if d["name"] == prefix + n), None)
                if prev is None:
                    report.layers.append({"name": prefix + n, "seconds": sec, "algorithm": rounder})
                else:
                    prev["seconds"] += sec
                    prev["algorithm"] += "+" + rounder
    statics = [m for m in layer.modules() if isinstance(m, ActQuantizer) and not m.spec.dynamic]
    if statics and inputs is not None:
        for m in statics:
            m.absmax.zero_()
            m.observing = True
        run_block(layer, inputs, kwargs)
        for m in statics:
            m.finish_calibration()


def _move_outside_layers(model: nn.Module, device: torch.device) -> None:
    """The modules that run before decoder layer 0 (embeddings, rotary embedding) onto the device."""
    layers = decoder_layers(model)
    for child in model.model.children():
        if child is not layers:
            child.to(device)


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


def _unpack(cfg_like: Any):
    """(QuantSpec, PTQConfig, data path, text field) from a RunConfig, a dict or a namespace."""
    get = (lambda k, d=None: cfg_like.get(k, d)) if isinstance(cfg_like, dict) else (
        lambda k, d=None: getattr(cfg_like, k, d))
    quant, ptq, data = get("quant"), get("ptq"), get("data")
    spec = parse(quant) if isinstance(quant, str) else _as_spec(quant)
    pcfg = _as_ptq(ptq if ptq is not None else PTQConfig())
    dget = (lambda k: (data or {}).get(k)) if data is None or isinstance(data, dict) else (
        lambda k: getattr(data, k, None))
    data_path, text_field = dget("path"), dget("text_field") or "text"
    return spec, pcfg, data_path, text_field


def _as_spec(quant: Any) -> QuantSpec:
    if isinstance(quant, QuantSpec):
        return quant.check()
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(quant, resolve=True) if not isinstance(quant, dict) else quant
    if d.get("scheme"):
        base = parse(d["scheme"]).to_dict()
        base.update({k: v for k, v in d.items() if k != "scheme" and v is not None})
        d = base
    d = {k: v for k, v in d.items() if k != "scheme"}
    return QuantSpec.from_dict(d)


def _as_ptq(ptq: Any) -> PTQConfig:
    if isinstance(ptq, PTQConfig):
        return ptq
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(ptq, resolve=True) if not isinstance(ptq, dict) else dict(ptq)
    if isinstance(d.get("method"), (list, tuple)):
        d["method"] = "+".join(d["method"])
    return PTQConfig(**d)

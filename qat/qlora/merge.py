"""Merging trained adapters into something that ships (`lora.merge`).

- `qalora`: a QA-LoRA adapter's weight is constant on each (row, weight group) block, so it folds exactly
  into the zero point: the codes and scales stay, and a real-valued part of the zero point (an offset per
  block, in weight units) is added. Convert writes it with float zero points (format version 4, which
  transformers loads; `qat.export.real_zero`).
- `requant`: the base dequantized (not the original fp weights) plus the adapter, quantized again: RTN onto
  the base's own grid (its scales and zero points, so a zero adapter gives the base back bit for bit; a
  group the merged weight leaves gets fresh min/max scales instead of clipping), or GPTQ afresh from the
  merged weight on calibration text, or GPTQ's error feedback onto the base's own grid (`gptq-grid`, `gptq-keep`:
  `requant.py`). The result is a PTQ folder; each layer's merge error goes into a report.
- `bf16`: the base dequantized plus the adapter as a plain full-precision model.

A packed experts stack is a `PackedLinear` over its (E*out, in) rows and its adapter's weight comes over the same
rows (B_e A_e per expert), so every merge runs on it as on a linear, per expert row; only the result is put back
together as the model's experts module (fake-quant `QuantExperts` for requant, plain parameters for bf16, the
packed stack with its offsets for qalora).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch
from peft import PeftModel
from torch import nn

from .. import kv as kv_quant
from ..apply import quant_spec_of
from ..experts import QuantExperts
from ..keys import PTQ_KEY, QUANT_KEY
from ..linear import QuantLinear
from ..ptq import PTQConfig, run_ptq
from ..ptq.gptq import GPTQConfig
from ..ptq.grid import freeze, frozen_spec
from ..quantizers import _round_to, dequantize_codes, minmax_qparams, quantize_codes, weight_rows
from ..runtime.packed import PackedLinear
from ..runtime.packed_experts import PackedExpertStack
from ..spec import QuantSpec, TensorSpec
from .adapters import PackedLoraLinear
from .expert_adapters import PackedLoraExperts
from .requant import GRID_METHODS, requant_on_grid

LORA_LAYERS = (PackedLoraLinear, PackedLoraExperts)


def _adapted(peft_model: PeftModel) -> dict[str, tuple[Any, str]]:
    """Base-model name -> (its LoRA layer, the active adapter) for every adapted packed linear or expert stack."""
    inner = peft_model.base_model.model
    found = {}
    for name, m in inner.named_modules():
        if isinstance(m, LORA_LAYERS):
            adapters = [a for a in m.active_adapters if a in m.lora_A]
            if len(adapters) != 1:
                raise ValueError(f"{name} has {len(adapters)} active adapters; merge one adapter at a time")
            found[name] = (m, adapters[0])
    return found


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def merge_qalora(peft_model: PeftModel) -> nn.Module:
    """The base with every QA-LoRA adapter folded into its layer's zero points (`PackedLinear.offset`)."""
    for name, (lora, adapter) in _adapted(peft_model).items():
        base = lora.get_base_layer()
        if adapter not in getattr(lora, "qalora_group_size", {}):  # peft's QA-LoRA variant sets it, as ours does
            raise ValueError(f"{name}: lora.merge=qalora folds QA-LoRA adapters only; this one is plain LoRA "
                             "(lora.variant=lora): use lora.merge=requant or bf16")
        if base.nf4 or base.input_quantizer is not None:
            raise ValueError(f"{name}: lora.merge=qalora needs an integer weight-only (a16) base layer; "
                             "use lora.merge=requant or bf16")
        wide = torch.float64 if base.compute_dtype == torch.float64 else torch.float32
        delta = lora.group_delta(adapter).to(wide)
        base.offset = delta if base.offset is None else base.offset.to(wide) + delta
    return peft_model.unload()


def _grid(base: PackedLinear) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The base layer's (scale, unsigned zero point) per weight row of `weight_rows`, fp32."""
    s = base.group_scales()
    if base.weight_spec.granularity == "tensor":
        s = s[:1, :1]
    z = None
    if base.zero is not None:
        z = base.zero.float() + (128 if base.bits == 8 else 0)
        z = z[:1, :1] if base.weight_spec.granularity == "tensor" else z
    return _round_to(s.reshape(-1, 1), base.compute_dtype), None if z is None else z.reshape(-1, 1)


def _widened(rows: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor], spec, dtype: torch.dtype):
    """The base grid, with fresh min/max scales (and zero points) on the rows the merged weight leaves: an
    adapter that pushes a weight past the grid's end would otherwise be clipped there."""
    if spec.format == "nf4":
        out = (rows / s).abs().amax(-1) > 1
    else:
        y = (rows / s).round() + (0 if z is None else z)
        out = ((y < spec.qmin) | (y > spec.qmax)).any(-1)
    if bool(out.any()):
        s2, z2 = minmax_qparams(rows[out], spec, dtype)
        s = s.clone()
        s[out] = s2
        if z is not None:
            z = z.clone()
            z[out] = z2
    return s, z


def _nearest(base: PackedLinear, target: torch.Tensor, s: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
    """`target` rounded to nearest on the grid (s, z) laid out as `weight_rows` of the base's spec."""
    rows = weight_rows(target, base.weight_spec)
    return dequantize_codes(quantize_codes(rows, s, z, base.weight_spec), s, z, base.weight_spec).reshape(target.shape)


def _merged_weights(peft_model: PeftModel) -> dict[str, tuple[PackedLinear, torch.Tensor, torch.Tensor]]:
    """Base-model name -> (packed layer, its dequantized weight, the adapter's weight), fp32, every packed linear."""
    adapted = _adapted(peft_model)
    out = {}
    for name, m in peft_model.base_model.model.named_modules():
        base = m.get_base_layer() if isinstance(m, LORA_LAYERS) else m
        if not isinstance(base, PackedLinear) or name.endswith(".base_layer"):  # the LoRA layer names it
            continue
        w0 = base.dequantized_weight(torch.float32)
        delta = adapted[name][0].get_delta_weight(adapted[name][1]) if name in adapted else torch.zeros_like(w0)
        out[name] = (base, w0, delta.to(w0.device))
    return out


def _error(w: torch.Tensor, target: torch.Tensor, delta: torch.Tensor, w0: torch.Tensor) -> dict[str, Any]:
    err = float(torch.linalg.vector_norm(w - target))
    d = float(torch.linalg.vector_norm(delta))
    return {"error": err / max(float(torch.linalg.vector_norm(target)), 1e-30),
            "adapter": d / max(float(torch.linalg.vector_norm(w0)), 1e-30),
            "adapter_lost": err / d if d > 0 else None}


@torch.no_grad()
def merge_requant(
    peft_model: PeftModel, method: str = "rtn", calib_ids: Optional[torch.Tensor] = None,
    gptq: Optional[GPTQConfig] = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """(a PTQ-kind fake-quant model of base + adapter re-quantized, the per-layer merge report)."""
    merged = _merged_weights(peft_model)
    spec: QuantSpec = quant_spec_of(peft_model.base_model.model)
    model = peft_model.unload()
    report = []
    if method in ("rtn", *GRID_METHODS):
        if method != "rtn" and calib_ids is None:
            raise ValueError(f"lora.requant={method} needs calibration token ids (the training text gives them)")
        fspec = frozen_spec(spec)
        grids = {name: _widened(weight_rows(w0 + delta, base.weight_spec), *_grid(base), base.weight_spec,
                                base.compute_dtype) for name, (base, w0, delta) in merged.items()}
        # rtn, and the packed expert stacks of the grid methods (no per-expert Hessian there): to nearest
        tag = {"algorithm": "rtn-grid"} if method != "rtn" else {}
        rounded = {name: (_nearest(base, w0 + delta, *grids[name]), tag)
                   for name, (base, w0, delta) in merged.items()
                   if method == "rtn" or isinstance(base, PackedExpertStack)}
        experts = {n: (merged[n][0], w, *grids[n]) for n, (w, _) in rounded.items()
                   if isinstance(merged[n][0], PackedExpertStack)}
        for parent, stacks in _by_module(experts).items():
            module = _restore(model, parent, {p: (b, w) for p, (b, w, _, _) in stacks.items()})
            _freeze_experts(module, parent, {p: (b, s, z) for p, (b, _, s, z) in stacks.items()})
        if method != "rtn":
            linears = {n: (b, w0 + d, w0) for n, (b, w0, d) in merged.items() if n not in rounded}
            rounded.update(requant_on_grid(model, linears, grids, method, calib_ids, gptq or GPTQConfig()))
        for name, (base, w0, delta) in merged.items():
            w, extra = rounded[name]
            report.append({"name": name, **_error(w, w0 + delta, delta, w0), **extra})
            if isinstance(base, PackedExpertStack):
                continue
            s, z = grids[name]
            lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                            dtype=base.compute_dtype, device=w.device)
            lin.weight.requires_grad_(False)
            q = QuantLinear.from_linear(lin, replace(base.weight_spec, learnable="lsq"), base.act_spec)
            freeze(q, w, s, z)
            if base.bias is not None:
                q.bias.copy_(base.bias)
            _replace(model, name, q)
        setattr(model.config, QUANT_KEY, fspec.to_dict())
    elif method == "gptq":
        if calib_ids is None:
            raise ValueError("lora.requant=gptq needs calibration token ids (the training text gives them)")
        targets, stacks = {}, {}
        for name, (base, w0, delta) in merged.items():
            targets[name] = (w0 + delta, delta, w0)
            if isinstance(base, PackedExpertStack):
                stacks[name] = (base, w0 + delta)
                continue
            lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                            dtype=base.compute_dtype, device=w0.device)
            lin.weight.copy_(w0 + delta)
            if base.bias is not None:
                lin.bias.copy_(base.bias)
            _replace(model, name, lin)
        for parent, weights in _by_module(stacks).items():
            _restore(model, parent, weights)
        delattr(model.config, QUANT_KEY)
        kv_quant.uninstall(model)
        cfg = PTQConfig(method="gptq", progress=False, gptq=gptq or GPTQConfig())
        model, _ = run_ptq(model, spec, cfg, calib_ids)
        for name, (target, delta, w0) in targets.items():
            parent, _, param = name.rpartition(".")
            owner = model.get_submodule(parent)
            if isinstance(owner, QuantExperts):
                w = owner.quantized_weight(param).float().reshape(target.shape)
            else:
                w = model.get_submodule(name).quantized_weight().float()
            report.append({"name": name, **_error(w, target, delta, w0)})
    else:
        raise ValueError(f"lora.requant={method!r}: use rtn, gptq, gptq-grid or gptq-keep")
    setattr(model.config, PTQ_KEY, {"method": f"qlora+requant-{method}",
                                    "calib_tokens": 0 if calib_ids is None else int(calib_ids.numel())})
    return model, report


@torch.no_grad()
def merge_bf16(peft_model: PeftModel, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Base + adapter as a plain model in `dtype` (nn.Linear layers and the model's own experts modules, no
    quantization left)."""
    merged = _merged_weights(peft_model)
    model = peft_model.unload()
    stacks = {}
    for name, (base, w0, delta) in merged.items():
        if isinstance(base, PackedExpertStack):
            stacks[name] = (base, w0 + delta)
            continue
        lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype,
                        device=w0.device)
        lin.weight.copy_(w0 + delta)
        if base.bias is not None:
            lin.bias.copy_(base.bias)
        _replace(model, name, lin)
    for parent, weights in _by_module(stacks).items():
        _restore(model, parent, weights, dtype)
    kv_quant.uninstall(model)
    for key in (QUANT_KEY, PTQ_KEY):
        if hasattr(model.config, key):
            delattr(model.config, key)
    return model.to(dtype).requires_grad_(False)


def _by_module(stacks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`<experts>.<param>` -> item, as experts module -> param -> item."""
    out: dict[str, dict[str, Any]] = {}
    for name, item in stacks.items():
        parent, _, param = name.rpartition(".")
        out.setdefault(parent, {})[param] = item
    return out


def _restore(model: nn.Module, parent: str, weights: dict[str, tuple[PackedExpertStack, torch.Tensor]],
             dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The packed experts module `parent` as the model's own class again, holding the (E*out, in) weights given
    (in `dtype`, else the base's compute dtype)."""
    return model.get_submodule(parent).restore({
        p: w.reshape(b.num_experts, b.expert_out, b.in_features).to(dtype or b.compute_dtype)
        for p, (b, w) in weights.items()})


def _freeze_experts(module: nn.Module, name: str,
                    grids: dict[str, tuple[PackedExpertStack, torch.Tensor, Optional[torch.Tensor]]]) -> None:
    """`freeze` for an experts module whose parameters already sit on their grids: fake quant with `lsq` weight
    quantizers holding those scales and zero points (one per stacked row, as the stack held them)."""
    specs: dict[str, tuple[Optional[TensorSpec], Optional[TensorSpec]]] = {
        p: (replace(b.weight_spec, learnable="lsq"), b.act_spec) for p, (b, _, _) in grids.items()}
    QuantExperts.wrap(module, specs, name, probe=False)
    for p, (_, s, z) in grids.items():
        wq = module.weight_quantizers[p]
        wq.scale.data = s.detach().reshape(-1, 1).float().to(wq.scale.device).clone()
        if wq.zero is not None:
            wq.zero.data = z.detach().reshape(-1, 1).float().to(wq.zero.device).clone()

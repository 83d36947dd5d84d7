"""The frozen, packed base of a QLoRA run, built from any folder distqat reads.

- a base model (or `bundled:` name): quantized at load by RTN with the run's spec (NF4 with double-quantized
  scales when asked), exactly as `quantize_model` fake-quantizes it;
- a QAT or PTQ folder: its trained or calibrated codes and scales as they are;
- an integer checkpoint: its packed buffers as they are;
- another tool's quantized folder (GPTQ, AWQ GEMM, compressed-tensors): its codes, scales and zero points as
  stored (`qat.export.foreign`), computed in the model's dtype.
Every linear the spec quantizes becomes a `PackedLinear`, every fused experts module a `PackedExperts` (no expert
stays full precision: a model whose experts are not all quantized is refused); every parameter is frozen.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..apply import quantize_model
from ..coverage import CoverageError
from ..experts import ExpertsLayoutError, QuantExperts, describe, experts_modules
from ..export import load_quantized
from ..export.foreign import load_foreign
from ..io.folders import Folder, Kind, inspect, load_fake_quant
from ..io.models import load_model, resolve_dtype
from ..keys import QUANT_KEY
from ..linear import QuantLinear
from ..online import online_of
from ..quantizers import WeightQuantizer
from ..runtime.int_linear import IntLinear
from ..runtime.packed import PackedLinear
from ..runtime.packed_experts import PackedExperts
from ..spec import FP4_FORMATS, QuantSpec


def pack_model(model: nn.Module, double_quant: bool = False) -> list[str]:
    """Replace the model's QuantLinear (with a weight quantizer) and IntLinear layers by PackedLinear and its
    fake-quant experts by PackedExperts, in place, and freeze every parameter; returns the packed layers' names
    (an experts module's as `<module>.<param>`, one per stacked projection)."""
    fp4 = next((n for n, m in model.named_modules() if isinstance(m, WeightQuantizer) and m.spec.format in FP4_FORMATS),
               None)
    if fp4 is not None:
        # the packed layers hold integer or NF4 codes; e2m1 codes with e8m0/e4m3 block scales are not among them
        raise ValueError(f"{fp4.rsplit('.', 1)[0]}: a QLoRA base packs integer or NF4 grids, not "
                         f"{model.get_submodule(fp4).spec.format}; train LoRA with quant.scheme=w4g32 or wnf4g64, or "
                         "train the fp4 student itself (train.mode=qat)")
    experts = check_experts(model)
    names = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear) and mod.weight_quantizer is not None:
            packed = PackedLinear.from_quant_linear(mod, double_quant)
        elif isinstance(mod, IntLinear) and not isinstance(mod, PackedLinear):
            packed = PackedLinear.from_int_linear(mod)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed)
        names.append(name)
    for name, mod in experts:
        PackedExperts.pack(mod, double_quant)
        names += [f"{name}.{p}" for p in mod.expert_layout.params]
    if not names:
        raise ValueError("the model has no quantized linear layer to pack; set quant.scheme (e.g. w4g64)")
    model.requires_grad_(False)
    return names


def check_experts(model: nn.Module) -> list[tuple[str, QuantExperts]]:
    """The fake-quant experts modules to pack; CoverageError, before anything changes, naming a fused expert
    weight that would stay full precision in the base (a layout distqat does not know, an excluded module or
    projection): the packed base holds every expert as codes."""
    out = []
    for name, mod in experts_modules(model):
        if not isinstance(mod, QuantExperts):
            try:
                layout = describe(mod, name)
            except ExpertsLayoutError as e:
                raise CoverageError(f"{str(e).split('; keep it')[0]}; a QLoRA base packs every expert, so this "
                                    "model has no packed base") from None
            missing = layout.params[0]
        else:
            missing = next((p for p in mod.expert_layout.params if p not in mod.weight_quantizers), None)
            if missing is None:
                out.append((name, mod))
                continue
        raise CoverageError(f"{name}.{missing} stays full precision, and a QLoRA base packs every expert as codes: "
                            f"drop it from quant.exclude and quant.overrides (every expert takes the weight scheme)")
    return out


def build_base(
    name_or_path: Union[str, Path, Folder], spec: Optional[QuantSpec], dtype: Union[str, torch.dtype] = "auto",
    attn_implementation: Optional[str] = "sdpa", trust_remote_code: bool = False, double_quant: bool = True,
) -> tuple[nn.Module, Folder]:
    """(the packed, frozen base model, the folder it came from). `spec` quantizes a base model at load; a
    quantized folder brings its own spec, and `spec` is then ignored."""
    folder = name_or_path if isinstance(name_or_path, Folder) else inspect(name_or_path)
    kwargs = {"attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    turns = online_of(folder.config)
    if turns is not None and "down" in turns.ops:
        raise ValueError(f"{folder.path} turns each down_proj's input online (ptq.rotate.online has down): a LoRA "
                         "beside down_proj would read the unturned input and merge wrongly; use a folder rotated "
                         "without online=[down], or train.mode=qat")
    if folder.kind is Kind.BASE:
        if spec is None or spec.weight is None:
            raise ValueError("train.mode=qlora quantizes a base model at load: set quant.scheme (e.g. w4g64 or "
                             "wnf4g64), or point model.name_or_path at a ptq, train or convert output")
        model = load_model(folder.path, dtype, **kwargs)
        quantize_model(model, spec)
        pack_model(model, double_quant and spec.weight.format == "nf4")
    elif folder.kind in (Kind.QAT, Kind.PTQ):
        model = load_fake_quant(folder, resolve_dtype(dtype), **kwargs)
        pack_model(model)
    elif folder.kind is Kind.INT and folder.spec is not None and folder.spec.weight is not None \
            and folder.spec.weight.format == "fp8":
        raise ValueError(f"{folder.path} is an FP8 (e4m3) folder: QLoRA packs integer or NF4 grids; train on its "
                         "base model with quant.scheme=w4g64 or wnf4g64, or on a ptq/train output of those")
    elif folder.kind is Kind.INT:
        model = load_quantized(folder, dtype=None if dtype == "auto" else resolve_dtype(dtype))
        if folder.spec is not None:  # convert and the merges read the spec from the config, as for QAT folders
            setattr(model.config, QUANT_KEY, folder.spec.to_dict())
        pack_model(model)
    elif folder.kind is Kind.FOREIGN:
        if folder.spec is None:
            raise ValueError(f"{folder.path}: a QLoRA base packs one integer weight-only scheme; this "
                             f"{folder.record['format']} folder holds float (fp8/fp4) weights, activation "
                             "quantization or several schemes; train on its base model with quant.scheme")
        model = load_foreign(folder, dtype=None if dtype == "auto" else resolve_dtype(dtype))
        pack_model(model)
        compute = next(p for p in model.parameters() if p.is_floating_point()).dtype
        for m in model.modules():  # fp16 scales in an fp32 model: dequantize in fp32 (exact), not in fp16
            if isinstance(m, PackedLinear):
                m.compute_dtype = compute
    elif folder.kind is Kind.AQLM:
        raise ValueError(f"{folder.path} is an AQLM folder: its codes and codebooks are no grid QLoRA can pack; "
                         "fine-tune its codebooks with distqat train train.init=<that folder>, or train LoRA on its "
                         "base model with quant.scheme")
    else:
        raise ValueError(f"{folder.path} is an LLM.int8() model: it keeps fp weights, so there is no packed base "
                         "to train on; use its base model with quant.scheme=w8 or another spec")
    return model.eval(), folder


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of every tensor of the base (not the adapters): a checkpoint's adapters fit this base only."""
    h = hashlib.sha256()
    # Names as in the bare base: peft wraps each adapted layer and calls the original its base_layer.
    tensors = [(n.replace(".base_layer.", "."), t) for n, t in [*model.named_parameters(), *model.named_buffers()]]
    for name, t in sorted((n, t) for n, t in tensors if "lora_" not in n and t is not None):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

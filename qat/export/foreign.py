"""Another tool's quantized folder (`Kind.FOREIGN`: GPTQ, AWQ GEMM, compressed-tensors) as distqat's layers, its
codes, scales and zero points as stored.

- `load_foreign`: the model with `IntLinear` layers, what `qat.load.load` (and so `eval`) and the QLoRA base use.
  A compressed-tensors folder is the integer format `convert` writes, less distqat's record: `load_quantized`
  reads it. GPTQ and AWQ layers are unpacked (`qat.io.foreign`) and repacked in the IntLinear layout.
- `load_foreign_fake_quant`: the same numbers as a fake-quant model (a QAT start, `train.init=<folder>`): each
  layer a QuantLinear whose weight is the folder's dequantized weight and whose frozen lsq quantizer holds its
  scales and zero points, so fake quant gives back that weight bit for bit (as a PTQ result is frozen).

Scales keep the dtype they were saved in unless the model's dtype holds them exactly (fp16 in fp32), so the
dequantized weight (q - z) s is the folder's in any model dtype that can hold it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from ..apply import quantize_model
from ..io.folders import Folder, Kind, inspect
from ..io.foreign import awq_codes, gptq_codes
from ..io.models import ModelError
from ..keys import HF_QUANT_KEY, PTQ_KEY, QUANT_KEY
from ..linear import QuantLinear
from ..runtime.int_linear import IntLinear
from ..runtime.pack import pack_int32
from .format import FormatError
from .load import load_quantized

LAYER_KEYS = ("qweight", "qzeros", "scales", "g_idx", "bias")
_WIDER = {torch.float16: (torch.float32, torch.float64), torch.bfloat16: (torch.float32, torch.float64),
          torch.float32: (torch.float64,)}


def _folder(path: Union[str, Path, Folder]) -> Folder:
    folder = path if isinstance(path, Folder) else inspect(path, what="the quantized folder")
    if folder.kind is not Kind.FOREIGN:
        raise ModelError(f"{folder.path} is a {folder.kind.value} folder, not a GPTQ, AWQ or compressed-tensors one")
    return folder


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{path} holds no .safetensors weight files (distqat never unpickles .bin weights); "
                          "save the model with safe_serialization=True")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except SafetensorError as e:
            raise FormatError(f"{f} is not a readable safetensors file ({e}); it is truncated or corrupt") from None
    return out


def _int_linear(lin: nn.Linear, codes: torch.Tensor, zero: Optional[torch.Tensor], scale: torch.Tensor,
                bias: Optional[torch.Tensor], folder: Folder, dtype: torch.dtype) -> IntLinear:
    """The IntLinear of unsigned codes (N, K), unsigned zero points (N, G) or None (the symmetric centre)."""
    spec = folder.spec.weight
    m = IntLinear(lin.in_features, lin.out_features, spec, None, bias is not None, dtype)
    if spec.bits == 8:
        m.qweight = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        m.zero = None if zero is None else (zero.to(torch.int16) - 128).to(torch.int8).contiguous()
    else:
        m.qweight = pack_int32(codes, spec.bits)
        m.zero = None if zero is None else zero.to(torch.uint8).contiguous()
    m.scale = (scale.to(dtype) if dtype in _WIDER.get(scale.dtype, ()) else scale).contiguous()
    if bias is not None:
        m.bias.data = bias.to(dtype)
    return m


def load_foreign(
    path: Union[str, Path, Folder], dtype: Optional[torch.dtype] = None, device: Union[str, torch.device, None] = None,
) -> nn.Module:
    """The folder's model with IntLinear layers holding its codes, in its saved dtype unless `dtype`; FormatError
    (one line) for a layer that is not the declared layout."""
    folder = _folder(path)
    fmt = folder.record["format"]
    if fmt == "compressed-tensors":
        model = load_quantized(folder, device=device, dtype=dtype)
        if folder.spec is not None:
            setattr(model.config, QUANT_KEY, folder.spec.to_dict())
        return model
    dtype = dtype or folder.dtype
    tensors = _tensors(folder.path)
    clean = {k: v for k, v in folder.config.items() if k != HF_QUANT_KEY}
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**clean), dtype=dtype)
    modules = dict(model.named_modules())
    layers = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not layers:
        raise FormatError(f"{folder.path}: a {fmt} folder without any .qweight tensor; it is incomplete")
    unpack = gptq_codes if fmt == "gptq" else awq_codes
    for name in layers:
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise FormatError(f"{folder.path}: {name} holds {fmt} codes but is not a linear of "
                              f"{type(model).__name__} (fused MoE experts are not read from {fmt} folders)")
        own = {key: tensors[f"{name}.{key}"] for key in LAYER_KEYS if f"{name}.{key}" in tensors}
        try:
            codes, zero, scale = unpack(own, folder.record, name, lin.out_features, lin.in_features)
        except ValueError as e:
            raise FormatError(f"{folder.path}: {e}") from None
        mod = _int_linear(lin, codes, zero, scale, own.get("bias") if lin.bias is not None else None, folder, dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, mod)
    rest = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in layers}
    result = model.load_state_dict(rest, strict=False)
    owned = {f"{n}.{b}" for n in layers for b in ("qweight", "scale", "zero", "bias", "offset")}
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if k not in owned and not (k == "lm_head.weight" and tied)]
    if missing or result.unexpected_keys:
        raise FormatError(f"{folder.path}: weights do not fit {type(model).__name__}: missing {missing[:4]}, "
                          f"unexpected {result.unexpected_keys[:4]}; the folder is incomplete or for another model")
    if tied:
        model.tie_weights()
    if folder.spec is not None:  # convert and the QLoRA merges read the spec from the config, as for our folders
        setattr(model.config, QUANT_KEY, folder.spec.to_dict())
    model.eval()
    return model.to(device) if device is not None else model


@torch.no_grad()
def load_foreign_fake_quant(path: Union[str, Path, Folder], dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The folder as a fake-quant model whose quantized weights are the folder's dequantized weights bit for bit
    (in fp32 or fp64; a 16-bit dtype other than the scales' rounds them); PTQ_KEY records where it came from."""
    folder = _folder(path)
    if folder.spec is None:
        raise ModelError(f"{folder.path}: a QAT start needs one integer weight-only scheme for every layer; this "
                         f"{folder.record['format']} folder holds float (fp8/fp4) weights, activation quantization "
                         "or several schemes")
    model = load_foreign(folder, dtype)
    dtype = dtype or folder.dtype
    ints = {n: m for n, m in model.named_modules() if isinstance(m, IntLinear)}
    if any(m.act_spec is not None or m.offset is not None for m in ints.values()):
        raise ModelError(f"{folder.path}: a QAT start reads weight-only integer layers")
    qparams: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    for name, m in ints.items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype)
        lin.weight.data = m.dequantized_weight(torch.float64).to(dtype)
        if m.bias is not None:
            lin.bias.data = m.bias.data.to(dtype)
        _, zero = m.unsigned_codes()
        qparams[name] = (m.scale.float(), None if zero is None else zero.float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    delattr(model.config, QUANT_KEY)
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in ints]
    spec = replace(folder.spec, weight=replace(folder.spec.weight, learnable="lsq"), include=["*"],
                   exclude=sorted(others))
    quantize_model(model, spec)
    for name, (scale, zero) in qparams.items():
        wq = model.get_submodule(name).weight_quantizer
        wq.scale.data = scale.reshape(-1, 1).clone()
        if wq.zero is not None:
            wq.zero.data = zero.reshape(-1, 1).clone()
    setattr(model.config, PTQ_KEY, _record(folder))
    return model.eval()


def _record(folder: Folder) -> dict[str, Any]:
    return {"method": f"{folder.record['format']} folder", "folder": str(folder.path), **folder.record}


def inexact_layer(model: nn.Module) -> Optional[str]:
    """The first QuantLinear whose fake-quant weight is not its stored weight (None: every one is exact): what a
    16-bit model dtype other than the scales' (fp16 scales in a bf16 student) changes in `load_foreign_fake_quant`."""
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.weight_quantizer is not None:
            with torch.no_grad():
                if not torch.equal(m.weight_quantizer(m.weight), m.weight):
                    return name
    return None

"""`distqat convert`: a QAT-trained or PTQ-quantized folder -> packed integer weights (compressed-tensors).

The integer codes, scales and zero points come from each layer's own `WeightQuantizer.quantize`, the
function the fake-quant forward uses, so the converted model computes with exactly the weights that
were trained or calibrated. The output folder is written beside its destination and renamed into
place at the end: an interrupted conversion leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from ..apply import quant_spec_of, quantizer_keys
from ..io.atomic import atomic_dir
from ..io.folders import Kind, inspect, load_fake_quant
from ..keys import EXPORT_KEY, HF_QUANT_KEY, QUANT_KEY
from ..linear import QuantLinear
from ..spec import QuantSpec
from .format import FORMAT_VERSION, FormatError, act_args, file_sha256, kv_args, layer_format, weight_args
from .pack import pack_int32

SHARD_BYTES = 4 << 30
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def compress_linear(layer: QuantLinear, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The compressed-tensors tensors of one QuantLinear, and its scheme (a config group without targets)."""
    w_spec, a_spec = layer.weight_spec, layer.act_spec
    if w_spec is None or layer.weight_quantizer is None:
        raise FormatError(f"{name}: an activation-only quantized layer has no integer weights; "
                          "quantize its weights too (e.g. w8a8) or exclude it")
    # Refuses what the runtime cannot run, before any work.
    scheme = {"weights": weight_args(w_spec, name), "input_activations": act_args(a_spec, name),
              "output_activations": None, "format": layer_format(w_spec, a_spec)}
    weight = layer.weight.detach()
    codes, scale, zero = layer.weight_quantizer.quantize(weight)
    bits, offset = w_spec.bits, 1 << (w_spec.bits - 1)
    # Stored unsigned (sym: q + 2^(b-1)); compressed-tensors' signed code is this minus 2^(b-1).
    unsigned = codes + offset if w_spec.symmetric else codes
    if w_spec.granularity == "tensor":
        scale = scale.reshape(1)
        zero = None if zero is None else zero.reshape(1)
    out: dict[str, torch.Tensor] = {"weight_scale": scale.to(weight.dtype).contiguous()}
    if scheme["format"] == "int-quantized":
        out["weight"] = (unsigned - offset).to(torch.int8).contiguous()
        if zero is not None:
            out["weight_zero_point"] = (zero - offset).to(torch.int8).contiguous()
    else:
        out["weight_packed"] = pack_int32(unsigned.to(torch.int32), bits)
        out["weight_shape"] = torch.tensor(list(weight.shape), dtype=torch.int64)
        if zero is not None:
            if w_spec.granularity == "tensor":
                out["weight_zero_point"] = (zero - offset).to(torch.int8)
            else:  # packed along the output dimension, as compressed-tensors does
                out["weight_zero_point"] = pack_int32(zero.to(torch.int32).t().contiguous(), bits).t().contiguous()
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().contiguous()
    # The scale must survive the dtype round trip exactly, or the model would not be the one trained.
    if not torch.equal(out["weight_scale"].float().reshape(scale.shape), scale.float()):
        raise FormatError(f"{name}: weight scales are not exact in {weight.dtype}; convert from the folder "
                          "in the dtype it was trained in")
    return out, scheme


def _save_shards(tensors: dict[str, torch.Tensor], out: Path) -> dict[str, str]:
    shards: list[OrderedDict] = [OrderedDict()]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if size and size + n > SHARD_BYTES:
            shards.append(OrderedDict())
            size = 0
        shards[-1][k] = t
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for name, s in zip(names, shards) for k in s}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {name: file_sha256(out / name) for name in names}


def convert_model(model: nn.Module, out: Union[str, Path], source: Optional[Path] = None) -> Path:
    """Write `model` (fake-quantized by qat.apply) as a compressed-tensors folder at `out`, atomically."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose another output folder or remove it")
    spec: Optional[QuantSpec] = quant_spec_of(model)
    tensors: dict[str, torch.Tensor] = OrderedDict()
    groups: dict[tuple, dict] = {}
    ignore: list[str] = []
    quantized: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            comp, scheme = compress_linear(mod, name)
            for k, t in comp.items():
                tensors[f"{name}.{k}"] = t
            quantized.add(name)
            key = (repr(mod.weight_spec), repr(mod.act_spec))
            groups.setdefault(key, {"targets": [], **scheme})["targets"].append(name)
        elif isinstance(mod, nn.Linear):
            ignore.append(name)
    if not quantized:
        raise FormatError("the model has no quantized linear layers to convert")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    skip = quantizer_keys(model)
    for k, t in model.state_dict().items():
        owner = k.rpartition(".")[0]
        if k in skip or owner in quantized:
            continue
        if tied and k == "lm_head.weight":
            continue  # tied to the embedding; transformers re-ties it on load
        tensors[k] = t.detach().contiguous()

    formats = {g["format"] for g in groups.values()}
    quant_config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": ignore,
        "kv_cache_scheme": kv_args(spec.kv) if spec is not None else None,
    }
    cfg = model.config.to_dict()
    for k in [k for k in cfg if k.startswith("_attn_implementation")] + [QUANT_KEY]:
        cfg.pop(k, None)
    cfg[HF_QUANT_KEY] = quant_config
    if tied and "lm_head" in quantized:
        cfg["tie_word_embeddings"] = False  # the head is now integer codes, the embedding stays float

    with atomic_dir(out) as tmp:  # an empty `out` (checked above) is replaced
        digests = _save_shards(tensors, tmp)
        cfg[EXPORT_KEY] = {
            "version": FORMAT_VERSION,
            "spec": spec.to_dict() if spec is not None else None,
            "kv_granularity": spec.kv.granularity if spec is not None and spec.kv is not None else None,
            "sha256": digests,
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if source is not None:
            for f in COPY_FILES:
                if (source / f).is_file():
                    shutil.copy2(source / f, tmp / f)
    return out


def convert_folder(src: Union[str, Path], out: Union[str, Path], dtype: Optional[torch.dtype] = None) -> Path:
    """Load a QAT or PTQ folder (in the dtype it was saved in, unless `dtype`) and write its integer checkpoint."""
    folder = inspect(src, what="the folder to convert")
    if folder.kind is Kind.INT:
        raise FormatError(f"{folder.path} is converted already; load it with qat.load.load")
    if folder.kind is Kind.LLM_INT8:
        raise FormatError(f"{folder.path} is an LLM.int8() model: its fp16 outlier columns have no place in the "
                          "integer format; evaluate that folder directly")
    if folder.kind is Kind.BASE:
        raise FormatError(f"{folder.path} holds no distqat quantization (config.json lacks {QUANT_KEY}); "
                          "quantize it first with distqat train or distqat ptq")
    model = load_fake_quant(folder, dtype or folder.dtype)
    print(f"distqat convert: {src} -> {out}", file=sys.stderr)
    return convert_model(model, out, source=folder.path)

"""`distqat convert`: a QAT-trained or PTQ-quantized folder -> packed integer weights (compressed-tensors).

The integer codes, scales and zero points come from each layer's own `WeightQuantizer.quantize`, the
function the fake-quant forward uses, so the converted model computes with exactly the weights that
were trained or calibrated. The output folder is written beside its destination and renamed into
place at the end: an interrupted conversion leaves no half-written checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file
from torch import nn

from ..apply import quant_spec_of, quantizer_keys
from ..coverage import routers
from ..io.atomic import atomic_dir, check_dir
from ..io.folders import Kind, inspect, load_fake_quant, spec_label
from ..keys import EXPORT_KEY, HF_QUANT_KEY, QUANT_KEY
from ..linear import QuantLinear
from ..runtime.fp4 import Fp4Linear
from ..runtime.fp8 import Fp8Linear
from ..runtime.int_linear import IntLinear
from ..spec import FP4_FORMATS, QuantSpec
from .experts import checkpoint_names, compress_experts, experts_of, experts_target, float_experts
from .format import FormatError, compress, file_sha256, kv_record, weight_args
from .fp4 import FP4_LAYOUTS, compress_fp4, share_globals
from .fp8 import compress_fp8
from .layers import compressed
from .load import load_quantized, verify_files
from .readers import kv_words, model_card, offset_layers, reader_notes, rotation_notes

SHARD_BYTES = 4 << 30
COPY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def compress_linear(layer: QuantLinear, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The compressed-tensors tensors of one QuantLinear, and its scheme (a config group without targets)."""
    w_spec = layer.weight_spec
    if w_spec is None or layer.weight_quantizer is None:
        raise FormatError(f"{name}: an activation-only quantized layer has no integer weights; "
                          "quantize its weights too (e.g. w8a8) or exclude it")
    if w_spec.format == "fp8":
        return compress_fp8(layer, name)
    if w_spec.format in FP4_FORMATS:
        return compress_fp4(layer, name)
    weight_args(w_spec, name)  # refuses a format with no integer codes before quantize is asked for them
    weight = layer.weight.detach()
    codes, scale, zero = layer.weight_quantizer.quantize(weight)
    # Stored unsigned: a symmetric code q as q + 2^(b-1), an asymmetric one (and its zero point) as it is.
    unsigned = codes + (1 << (w_spec.bits - 1)) if w_spec.symmetric else codes
    return compress(unsigned, scale, zero, w_spec, layer.act_spec, layer.bias, name, weight.dtype)


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
        # A full disk (safetensors says "... (os error 28)") is atomic_dir's one-line DiskFull naming the folder.
        save_file(shard, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for name, s in zip(names, shards) for k in s}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {name: file_sha256(out / name) for name in names}


def convert_model(model: nn.Module, out: Union[str, Path], source: Optional[Path] = None,
                  origin: Optional[dict[str, str]] = None, replace: bool = False, real_zero: bool = True) -> Path:
    """Write `model` (fake-quantized by qat.apply, or holding IntLinear layers) as a compressed-tensors folder at
    `out`, atomically. Layers with a real-valued zero point (a QA-LoRA merge) make it a format version 4 checkpoint
    whose weight-only integer layers all carry float zero points, which transformers runs (`real_zero`); with
    `real_zero=False`, version 2's `weight_offset`, which only distqat reads. `origin`, the
    SHA-256 of the source folder's files, is recorded (distqat_export.source) so that a rerun knows its output.
    A non-empty `out` is refused, or with `replace` (a run's own output folder, written again by its rerun)
    replaced whole once the new one is written."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not replace:
        raise FileExistsError(f"{out} exists and is not empty; choose another output folder or remove it")
    spec: Optional[QuantSpec] = quant_spec_of(model)
    tensors: dict[str, torch.Tensor] = OrderedDict()
    groups: dict[tuple, dict] = {}
    ignore: list[str] = []
    quantized: set[str] = set()
    found = experts_of(model)
    names = checkpoint_names(model) if found else None
    ck = names.module if names is not None else (lambda n: n)
    # One layout for every weight-only integer layer: a folder of float and packed asymmetric zero points would
    # need compressed-tensors' dequantize=True in transformers, which the float ones do not (see readers).
    real = real_zero and any(isinstance(m, IntLinear) and m.offset is not None for m in model.modules())
    for name, mod in model.named_modules():
        if isinstance(mod, (QuantLinear, IntLinear, Fp8Linear, Fp4Linear)):
            comp, scheme = compress_linear(mod, name) if isinstance(mod, QuantLinear) else \
                compressed(mod, name, real_zero=real)
            for k, t in comp.items():
                tensors[f"{ck(name)}.{k}"] = t
            quantized.add(name)
            key = (repr(mod.weight_spec), repr(mod.act_spec), scheme["format"])
            groups.setdefault(key, {"targets": [], **scheme})["targets"].append(ck(name))
        elif isinstance(mod, nn.Linear):
            ignore.append(ck(name))
    unshared = share_globals(tensors, [ck(n) for n in quantized])
    written = _write_experts(found, names, tensors, groups, ignore) if names is not None else set()
    if not quantized and not written:
        raise FormatError("the model has no quantized linear layers or experts to convert")
    ignore += [r for r in (ck(n) for n in sorted(routers(model))) if r not in ignore]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    skip = quantizer_keys(model)
    for k, t in model.state_dict().items():
        owner = k.rpartition(".")[0]
        if k in skip or owner in quantized or k in written:
            continue
        if tied and k == "lm_head.weight":
            continue  # tied to the embedding; transformers re-ties it on load
        tensors[names.key(k) if names is not None else k] = t.detach().contiguous()

    formats = {g["format"] for g in groups.values()}
    formats_all = set(formats)
    kv = kv_record(spec.kv if spec is not None else getattr(model, "kv_spec", None))  # IntLinear models: their own
    quant_config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": ignore,
        "kv_cache_scheme": None,  # the integer KV cache is in distqat_export.kv: see format.py
    }
    cfg = model.config.to_dict()
    # _name_or_path is where the source was loaded from: a path on this machine, meaningless elsewhere.
    for k in [k for k in cfg if k.startswith("_attn_implementation")] + [QUANT_KEY, "_name_or_path"]:
        cfg.pop(k, None)
    cfg[HF_QUANT_KEY] = quant_config
    if tied and "lm_head" in quantized:
        cfg["tie_word_embeddings"] = False  # the head is now integer codes, the embedding stays float

    unpacked_narrow = any(g["format"] == "int-quantized" and g["weights"]["num_bits"] < 8 for g in groups.values())
    offsets = sum(k.endswith(".weight_offset") for k in tensors)
    version = 4 if real else 3 if kv is not None or unpacked_narrow else 2 if offsets else 1
    experts_record = {"names": names.layout, "family": cfg.get("model_type")} if names is not None else None
    # online rotations (R3/R4) are named apart: readers.py
    notes = reader_notes(quant_config, kv_words(kv), experts_record, unshared, offsets) + rotation_notes(cfg)
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_dir(out, need=need) as tmp:  # an empty `out` (checked above), or one to replace
        digests = _save_shards(tensors, tmp)
        cfg[EXPORT_KEY] = {
            "version": version,
            "spec": spec.to_dict() if spec is not None else None,
            "kv": kv,
            "sha256": digests,
        }
        if experts_record is not None:  # which names the experts are written under (see qat.export.experts)
            cfg[EXPORT_KEY]["experts"] = experts_record
        if origin is not None:
            cfg[EXPORT_KEY]["source"] = {"sha256": origin}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        kind = "fp8" if formats_all == {"float-quantized"} else \
            "fp4" if formats_all <= set(FP4_LAYOUTS.values()) else "integer"
        (tmp / "README.md").write_text(model_card(out.name, spec_label(spec, "custom"), notes, version, kind))
        if source is not None:
            for f in COPY_FILES:
                if (source / f).is_file():
                    shutil.copy2(source / f, tmp / f)
    for line in notes:
        print(f"distqat convert: {line}", file=sys.stderr)
    return out


def _write_experts(found: dict, names, tensors: dict[str, torch.Tensor], groups: dict[tuple, dict],
                   ignore: list[str]) -> set[str]:
    """Add every experts module's entries (see qat.export.experts) and their config targets; the model state keys
    they replace (the stacked weights, and an integer experts module's buffers)."""
    written: set[str] = set()
    for name, (mod, lay, _) in found.items():
        entries = names.experts[name]
        pieces = compress_experts(mod, name, entries)
        if not pieces and names.layout == "fused":
            continue  # full precision, no mapping: the stacked weights stay as the model holds them
        if not pieces:
            tensors.update(float_experts(mod, entries))
            ignore += [x.name for p in lay.params for x in entries[p]]
        for p, ck_name, comp, scheme, key in pieces:
            for k, t in comp.items():
                tensors[f"{ck_name}.{k}"] = t
            group = groups.setdefault(key, {"targets": [], **scheme})
            target = experts_target(entries[p], lay, p)
            if target not in group["targets"]:
                group["targets"].append(target)
        written |= {f"{name}.{p}{s}" for p in lay.params for s in ("", "_qweight", "_scale", "_zero")}
    return written


def convert_folder(src: Union[str, Path], out: Union[str, Path], dtype: Optional[torch.dtype] = None) -> Path:
    """Load a QAT or PTQ folder (in the dtype it was saved in, unless `dtype`) and write its integer checkpoint; a
    converted folder holding `weight_offset` (format version 2) is written again with float zero points."""
    folder = inspect(src, what="the folder to convert")
    # A version 2 QA-LoRA merge (weight_offset) is written again with float zero points, which transformers runs.
    rewrite = folder.kind is Kind.INT and offset_layers(folder.path) > 0
    if folder.kind is Kind.INT and not rewrite:
        raise FormatError(f"{folder.path} is converted already; load it with qat.load.load")
    if folder.kind is Kind.LLM_INT8:
        raise FormatError(f"{folder.path} is an LLM.int8() model: its fp16 outlier columns have no place in the "
                          "integer format; evaluate that folder directly")
    if folder.kind is Kind.AQLM:
        raise FormatError(f"{folder.path} is an AQLM folder (codes + codebooks in transformers' AQLM layout): it is "
                          "in its deployment format already; load it with qat.load.load or transformers + aqlm")
    if folder.kind is Kind.BASE:
        raise FormatError(f"{folder.path} holds no distqat quantization (config.json lacks {QUANT_KEY}); "
                          "quantize it first with distqat train or distqat ptq")
    out = Path(out)
    check_dir(out, "--out")  # before the model loads: a bad output folder fails in a second
    origin = source_digests(folder.path)
    if out.exists() and any(out.iterdir()):
        if converted_from(out, origin):
            print(f"distqat convert: {out} holds {src} converted already (its checksums match); kept",
                  file=sys.stderr)
            return out
        raise FileExistsError(f"{out} exists and is not empty; choose another output folder or remove it")
    drop_stale_temps(out)
    dtype = dtype or folder.dtype
    model = load_quantized(folder, dtype=dtype) if rewrite else load_fake_quant(folder, dtype)
    print(f"distqat convert: {src} -> {out}", file=sys.stderr)
    return convert_model(model, out, source=folder.path, origin=origin)


def source_digests(folder: Path) -> dict[str, str]:
    """The SHA-256 of a source folder's config.json and weight files: what its conversion depends on."""
    return {f.name: file_sha256(f) for f in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]}


def converted_from(out: Path, origin: dict[str, str]) -> bool:
    """`out` is a finished conversion of the source whose digests are `origin`, its weight files whole: what a
    convert that was killed (or stopped) after its rename left, which its rerun keeps as it is."""
    try:
        cfg = json.loads((out / "config.json").read_text())
        meta = cfg.get(EXPORT_KEY) or {}
        if (meta.get("source") or {}).get("sha256") != origin or not meta.get("sha256"):
            return False
        verify_files(out, cfg)
    except (OSError, ValueError, AttributeError):  # no config.json, not JSON, not ours, a file that fails its sum
        return False
    return True


def drop_stale_temps(out: Path) -> None:
    """Remove the temp folders a killed convert to `out` left beside it (atomic_dir's `.<name>.tmp-XXXXXXXX`);
    nothing else there is ours to remove, and no other convert writes to the same `out` at the same time."""
    stale = re.compile(rf"\.{re.escape(out.name)}\.tmp-[A-Za-z0-9_]{{8}}")  # mkdtemp's 8 characters
    for p in out.parent.iterdir() if out.parent.is_dir() else []:
        if p.is_dir() and stale.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)

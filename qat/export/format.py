"""The compressed-tensors description of a distqat quantization, both ways.

A converted folder's config.json carries a standard `quantization_config` (quant_method
"compressed-tensors") in the terms standard readers apply correctly (see `readers`: weight-only layers
`pack-quantized`, int8-activation layers `int-quantized`, fp8 W8A8 layers `float-quantized`), plus a
`distqat_export` record: the format version, a SHA-256 per weight file (a truncated or edited file is
refused, not loaded silently wrong) and what the standard has no words for: the integer KV cache (per
token or per head and token, dynamic), whose compressed-tensors `kv_cache_scheme` would mean one static
float8 scale to vLLM.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from ..runtime.pack import pack_int32
from ..spec import FP4_FORMATS, TensorSpec

# Version 2 adds `weight_offset`, a real-valued part of the zero point (per output row and weight group,
# in weight units: W = (code - zero) * scale + offset), which a QA-LoRA merge folds its adapter into.
# Version 3 moves the KV cache spec from `kv_cache_scheme` to distqat_export.kv and writes int8-activation
# layers of any weight width as `int-quantized` (unpacked int8 codes). A folder is written with the lowest
# version whose readers run it as written, so older distqat versions refuse what they would misread.
# fp8 folders (`float-quantized`, see `fp8`) need no new version: readers before fp8 refuse float weights by
# their type rather than misread them.
# Version 4 writes a real-valued zero point the standard way (`real_zero`: naive-quantized codes, a float
# `weight_zero_point` declared by `zp_dtype`), which readers before it would cast to an integer zero point.
FORMAT_VERSION = 4
READ_VERSIONS = (1, 2, 3, 4)


class FormatError(ValueError):
    """A checkpoint or a spec that the integer format cannot represent; the message names the fix."""


def file_sha256(path: Path) -> str:
    """The SHA-256 a converted folder records per weight file, and checks before loading it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _int_args(spec: TensorSpec, strategy: str, dynamic: bool) -> dict[str, Any]:
    args: dict[str, Any] = {
        "num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": strategy,
        "dynamic": dynamic, "group_size": spec.group_size if spec.granularity == "group" else None,
        "observer": None if dynamic else "minmax",
    }
    return args


def weight_args(spec: TensorSpec, name: str) -> dict[str, Any]:
    if spec.format != "int":
        raise FormatError(f"{name}: {spec.format} weights have no integer packing here; "
                          "convert integer specs (e.g. w4g128, w8) or keep the fake-quant folder")
    strategy = {"tensor": "tensor", "channel": "channel", "group": "group"}[spec.granularity]
    return _int_args(spec, strategy, dynamic=False)


def act_args(spec: Optional[TensorSpec], name: str) -> Optional[dict[str, Any]]:
    if spec is None:
        return None
    if spec.format != "int" or spec.bits not in (4, 8) or not spec.dynamic or spec.granularity != "token":
        raise FormatError(
            f"{name}: activations {spec.bits}-bit {spec.format} {spec.granularity}"
            f"{'' if spec.dynamic else ' static'} have no integer kernel; the runtime runs dynamic per-token "
            "int8 or int4 activations (a8, a4) or none (a16); re-train or re-quantize with a8, a4 or a16"
        )
    return _int_args(spec, "token", dynamic=True)


def kv_record(spec: Optional[TensorSpec]) -> Optional[dict[str, Any]]:
    """The KV cache spec as distqat_export.kv (a TensorSpec dict); FormatError for a cache the runtime lacks."""
    if spec is None:
        return None
    if spec.format != "int" or not spec.dynamic or spec.granularity not in ("token", "head"):
        raise FormatError(f"quant.kv: {spec.format} {spec.granularity} kv has no integer cache here; "
                          "use dynamic int kv per token or per head (e.g. kv8, kv4)")
    return asdict(spec)


def layer_format(weight: TensorSpec, act: Optional[TensorSpec]) -> str:
    """int8-activation layers are `int-quantized` (int8 codes), the format whose activation quantization
    standard readers apply; weight-only layers pack their codes into int32 (`pack-quantized`)."""
    return "int-quantized" if act is not None else "pack-quantized"


def spec_from_args(args: dict[str, Any], kind: str) -> TensorSpec:
    """A TensorSpec from a compressed-tensors QuantizationArgs dict (ours or another tool's)."""
    if args.get("type") == "float" and int(args.get("num_bits", 8)) == 4:
        return _fp4_spec(args, kind)
    fmt = {"int": "int", "float": "fp8"}.get(args.get("type", "int"))
    if fmt is None or (fmt == "fp8" and int(args.get("num_bits", 8)) != 8):
        raise FormatError(f"{kind}: {args.get('num_bits')}-bit {args.get('type')} quantization is not a format this "
                          "runtime runs (integers, or 8-bit float as e4m3)")
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "tensor")
    gran = {"tensor": "tensor", "channel": "channel", "group": "group", "token": "token"}.get(strategy)
    if gran is None:
        raise FormatError(f"{kind}: strategy {strategy!r} is not supported (tensor, channel, group, token are)")
    return TensorSpec(
        bits=int(args.get("num_bits", 8)), symmetric=bool(args.get("symmetric", True)), granularity=gran,
        group_size=args.get("group_size") if gran == "group" else None, format=fmt,
        dynamic=bool(args.get("dynamic", False)) if kind != "weight" else True,
    )


def _fp4_spec(args: dict[str, Any], kind: str) -> TensorSpec:
    """NVFP4 (tensor_group of 16) or MXFP4 (group of 32) QuantizationArgs as a TensorSpec (see `fp4`)."""
    fmt = {("tensor_group", 16): "nvfp4", ("group", 32): "mxfp4"}.get((args.get("strategy"), args.get("group_size")))
    if fmt is None or not args.get("symmetric", True):
        raise FormatError(f"{kind}: fp4 {args.get('strategy')} blocks of {args.get('group_size')} are not a format "
                          "this runtime runs (NVFP4: tensor_group 16, MXFP4: group 32, symmetric)")
    return TensorSpec(bits=4, symmetric=True, granularity="group", group_size=FP4_FORMATS[fmt], format=fmt)


def matches(target: str, name: str, module_class: str) -> bool:
    """compressed-tensors target matching: `re:` regex over the module name, else a name or class name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, module_class)


def compress(
    unsigned: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], w_spec: TensorSpec,
    a_spec: Optional[TensorSpec], bias: Optional[torch.Tensor], name: str, dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The compressed-tensors tensors of one layer from its unsigned codes (N, K), scales and unsigned zero
    points (N, G), and its scheme (a config group without targets). Refuses what the runtime cannot run."""
    scheme = {"weights": weight_args(w_spec, name), "input_activations": act_args(a_spec, name),
              "output_activations": None, "format": layer_format(w_spec, a_spec)}
    bits, half = w_spec.bits, 1 << (w_spec.bits - 1)
    if w_spec.granularity == "tensor":
        scale = scale.reshape(1)
        zero = None if zero is None else zero.reshape(1)
    out: dict[str, torch.Tensor] = {"weight_scale": scale.to(dtype).contiguous()}
    # compressed-tensors' signed code is the unsigned one minus 2^(b-1).
    if scheme["format"] == "int-quantized":
        out["weight"] = (unsigned.to(torch.int16) - half).to(torch.int8).contiguous()
        if zero is not None:
            out["weight_zero_point"] = (zero.to(torch.int16) - half).to(torch.int8).contiguous()
    else:
        out["weight_packed"] = pack_int32(unsigned.to(torch.int32), bits)
        out["weight_shape"] = torch.tensor(list(unsigned.shape), dtype=torch.int64)
        if zero is not None:
            if w_spec.granularity == "tensor":
                out["weight_zero_point"] = (zero.to(torch.int16) - half).to(torch.int8)
            else:  # packed along the output dimension, as compressed-tensors does
                out["weight_zero_point"] = pack_int32(zero.to(torch.int32).t().contiguous(), bits).t().contiguous()
    if bias is not None:
        out["bias"] = bias.detach().contiguous()
    # The scale must survive the dtype round trip exactly, or the model would not be the one trained.
    if not torch.equal(out["weight_scale"].float().reshape(scale.shape), scale.float()):
        raise FormatError(f"{name}: weight scales are not exact in {dtype}; convert from the folder "
                          "in the dtype it was trained in")
    return out, scheme

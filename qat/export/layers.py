"""The saved form of the runtime's layers: a converted layer's compressed-tensors entries into an `IntLinear` or
`Fp8Linear` (`load_compressed`) and back (`compressed`, used when an already converted model is converted again).

The layers themselves, their buffers and their matmuls, are `qat.runtime`; which entries a layer has, and the
checks that a checkpoint matches its config, are the format's, so they live here.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from ..runtime.fp4 import Fp4Linear
from ..runtime.fp8 import FP8, Fp8Linear
from ..runtime.int_linear import IntLinear
from ..runtime.pack import pack_int32, packed_cols, unpack_int32
from .format import FormatError, compress
from .fp4 import compress_fp4_linear, load_fp4_linear
from .fp8 import fp8_scheme
from .real_zero import compress_real_zero, split_real_zero

__all__ = ["load_compressed", "compressed", "load_int_linear", "compress_int_linear", "load_fp8_linear",
           "compress_fp8_linear"]

RuntimeLinear = Union[IntLinear, Fp8Linear, Fp4Linear]


def load_compressed(layer: RuntimeLinear, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Fill `layer` (an IntLinear, Fp8Linear or Fp4Linear) from the entries of the checkpoint's layer `name`."""
    if isinstance(layer, Fp4Linear):
        return load_fp4_linear(layer, tensors, name)
    (load_fp8_linear if isinstance(layer, Fp8Linear) else load_int_linear)(layer, tensors, name)


def compressed(layer: RuntimeLinear, name: str, real_zero: bool = False) -> tuple[dict[str, torch.Tensor],
                                                                                 dict[str, Any]]:
    """The entries and scheme of `layer` (an IntLinear, Fp8Linear or Fp4Linear), as `load_compressed` reads them;
    `real_zero`: a weight-only integer layer with float zero points (`real_zero`), else its offset as version 2's."""
    if isinstance(layer, Fp4Linear):
        return compress_fp4_linear(layer, name)
    if isinstance(layer, Fp8Linear):
        return compress_fp8_linear(layer, name)
    return compress_int_linear(layer, name, real_zero)


@torch.no_grad()
def load_int_linear(layer: IntLinear, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Fill an IntLinear's buffers from the compressed-tensors entries of one layer, checking every shape."""
    n, k, b = layer.out_features, layer.in_features, layer.bits

    def need(key: str) -> torch.Tensor:
        if key not in tensors:
            raise FormatError(f"{name}: the checkpoint lacks {name}.{key}; it is incomplete or not "
                              "written by distqat convert")
        return tensors[key]

    def check(key: str, t: torch.Tensor, shape: tuple, dtypes: tuple) -> None:
        if tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
            raise FormatError(f"{name}.{key}: found {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} "
                              f"{'/'.join(str(d) for d in dtypes)}; the checkpoint does not match its config")

    scale = need("weight_scale")
    if scale.dim() == 1:
        scale = scale.reshape(-1, 1).expand(n, 1) if scale.numel() == 1 else scale.reshape(n, 1)
    check("weight_scale", scale, layer.scale.shape, (torch.bfloat16, torch.float16, torch.float32))
    layer.scale = scale.contiguous()
    zp = tensors.get("weight_zero_point")
    real = None
    if zp is not None and zp.is_floating_point():  # a real-valued zero point (see real_zero): integer zero + offset
        if "weight" not in tensors or layer.act_spec is not None or "weight_offset" in tensors:
            raise FormatError(f"{name}: a float zero point is read for weight-only layers with unpacked int8 codes "
                              "(naive-quantized) and no weight_offset; the checkpoint does not match its config")
        zp, real = split_real_zero(zp, layer.scale, b, name)
    if (zp is None) != layer.weight_spec.symmetric:
        raise FormatError(f"{name}: zero points {'missing' if zp is None else 'present'} but the config "
                          f"declares symmetric={layer.weight_spec.symmetric}")
    if "weight_packed" in tensors:
        packed = need("weight_packed")
        check("weight_packed", packed, (n, packed_cols(k, b)), (torch.int32,))
        shape = need("weight_shape")
        if [int(v) for v in shape] != [n, k]:
            raise FormatError(f"{name}.weight_shape is {shape.tolist()}, the model needs {[n, k]}")
        if b == 8:
            layer.qweight = (unpack_int32(packed, b, k).to(torch.int16) - 128).to(torch.int8)
        else:
            layer.qweight = packed.contiguous()
        if zp is not None:
            ng = layer.scale.shape[1]
            if zp.dtype == torch.int32 and zp.dim() == 2 and zp.shape[1] == ng:
                z = unpack_int32(zp.t().contiguous(), b, n).t()  # packed along the output dim
            else:
                z = (zp.to(torch.int16) + (1 << (b - 1))).reshape(-1, 1).expand(n, ng)
            layer.zero = (z.to(torch.int16) - 128).to(torch.int8) if b == 8 else z.to(torch.uint8).contiguous()
    else:
        w = need("weight")  # int-quantized: signed codes as int8 whatever the width
        check("weight", w, (n, k), (torch.int8,))
        half = 1 << (b - 1)
        if b != 8 and w.numel() and (int(w.min()) < -half or int(w.max()) >= half):
            raise FormatError(f"{name}.weight holds codes outside the {b}-bit range [{-half}, {half - 1}] "
                              "its config declares; the checkpoint does not match its config")
        layer.qweight = w.contiguous() if b == 8 else pack_int32(w.to(torch.int32) + half, b)
        if zp is not None:
            z = zp.to(torch.int8).reshape(-1, 1).expand(n, 1) if zp.numel() == 1 else zp.reshape(n, -1)
            check("weight_zero_point", z, layer.scale.shape, (torch.int8,))
            layer.zero = z.contiguous() if b == 8 else (z.to(torch.int16) + half).to(torch.uint8).contiguous()
    offset = tensors.get("weight_offset")
    if offset is not None:
        check("weight_offset", offset, layer.scale.shape, (torch.bfloat16, torch.float16, torch.float32))
        if layer.act_spec is not None:
            raise FormatError(f"{name}: a real-valued zero point (weight_offset) with int8 activations has "
                              "no kernel; merge QA-LoRA adapters into weight-only (a16) layers")
        layer.offset = offset.contiguous()
    if real is not None:
        layer.offset = real
    if layer.bias is not None:
        bias = need("bias")
        if tuple(bias.shape) != (n,):
            raise FormatError(f"{name}.bias: found {tuple(bias.shape)}, expected {(n,)}; the checkpoint "
                              "does not match its config")
        layer.bias.data = bias.to(layer.bias.dtype)



def compress_int_linear(layer: IntLinear, name: str, real_zero: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """An IntLinear's compressed-tensors tensors and scheme, the inverse of `load_int_linear`: a weight-only layer
    with float zero points when `real_zero`, else its offset (if any) as format version 2's `weight_offset`."""
    if real_zero and layer.act_spec is None:
        return compress_real_zero(layer, name)
    codes, zero = layer.unsigned_codes()
    out, scheme = compress(codes, layer.scale, zero, layer.weight_spec, layer.act_spec, layer.bias, name,
                           layer.scale.dtype)
    if layer.offset is not None:
        out["weight_offset"] = layer.offset.contiguous()
    return out, scheme



@torch.no_grad()
def load_fp8_linear(layer: Fp8Linear, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Fill an Fp8Linear's buffers from one layer's float-quantized entries, checking every shape and dtype."""
    n, k = layer.out_features, layer.in_features

    def need(key: str) -> torch.Tensor:
        if key not in tensors:
            raise FormatError(f"{name}: the checkpoint lacks {name}.{key}; it is incomplete or not "
                              "written by distqat convert")
        return tensors[key]

    w, s = need("weight"), need("weight_scale")
    if tuple(w.shape) != (n, k) or w.dtype != FP8:
        raise FormatError(f"{name}.weight: found {tuple(w.shape)} {w.dtype}, expected {(n, k)} {FP8}; "
                          "the checkpoint does not match its config")
    per_tensor = layer.weight_spec.granularity == "tensor"
    if s.dtype != torch.float32 or s.numel() != (1 if per_tensor else n):
        raise FormatError(f"{name}.weight_scale: found {tuple(s.shape)} {s.dtype}, expected "
                          f"{(1,) if per_tensor else (n, 1)} torch.float32; the checkpoint does not match its "
                          "config")
    if "weight_zero_point" in tensors:
        raise FormatError(f"{name}: an fp8 layer has no zero point; the checkpoint does not match its config")
    layer.qweight = w.contiguous()
    layer.scale = s.reshape(-1, 1).expand(n, 1).contiguous()
    if layer.bias is not None:
        bias = need("bias")
        if tuple(bias.shape) != (n,):
            raise FormatError(f"{name}.bias: found {tuple(bias.shape)}, expected {(n,)}")
        layer.bias.data = bias.to(layer.bias.dtype)



def compress_fp8_linear(layer: Fp8Linear, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An Fp8Linear's float-quantized tensors and scheme, the inverse of `load_fp8_linear`."""
    scheme = fp8_scheme(layer.weight_spec, layer.act_spec, name)
    scale = layer.scale[:1].reshape(1) if layer.weight_spec.granularity == "tensor" else layer.scale
    out = {"weight": layer.qweight.contiguous(), "weight_scale": scale.contiguous()}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().contiguous()
    return out, scheme

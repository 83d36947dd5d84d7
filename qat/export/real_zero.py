"""Real-valued zero points in the compressed-tensors layout: how a QA-LoRA merge ships to standard readers.

A QA-LoRA merge folds its adapter into the zero points: W = (code - zero) * scale + offset per (row, group), the
offset real-valued (`qat.qlora.merge.merge_qalora`). That is W = (code - z') * scale with z' = zero - offset / scale,
an affine grid with a float zero point, and compressed-tensors has the words for it: a weight-only group stored
`naive-quantized` (signed codes one per int8, `weight_scale`, `weight_zero_point`) whose QuantizationArgs set
`zp_dtype` to a float dtype. Its decompressor computes (code - zero_point) * scale in the scale's dtype
(`compressed_tensors.quantization.lifecycle.forward_helpers._dequantize`), with no rounding or clamping of the
zero point, and transformers' compressed-tensors integration builds a float `weight_zero_point` from `zp_dtype`, so
`AutoModelForCausalLM.from_pretrained(path)` runs the merged model. `pack-quantized` cannot hold it: its
decompressor unpacks the zero point from int32 words. The codes then take one byte each on disk (twice a packed
4-bit layer's); in memory distqat keeps them packed.

The zero point is written in fp32 (relative error 2^-24 of |z'| < 2^bits: far below a bf16 weight's rounding).
distqat reads it back as the integer zero nearest z' plus offset = (that zero - z') * scale per group: the same
weights, on the integer kernels and their per-group offset term (`qat.runtime.int_linear.IntLinear`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..runtime.int_linear import IntLinear
from .format import FormatError, weight_args

REAL_ZERO_DTYPE = torch.float32
REAL_ZERO_FORMAT = "naive-quantized"


def is_real_zero(weights: Optional[dict[str, Any]]) -> bool:
    """Whether a config group's weight QuantizationArgs declare a float zero point (`zp_dtype`)."""
    zdt = (weights or {}).get("zp_dtype")
    return bool(zdt) and not weights.get("symmetric", True) and "float" in str(zdt)


def real_zero_args(layer: IntLinear, name: str) -> dict[str, Any]:
    """The weight QuantizationArgs of `layer` written with a float zero point (asymmetric whatever the base was)."""
    args = weight_args(layer.weight_spec, name)
    # A per-tensor base has one scale repeated per row; its real zero point differs per row (and group).
    strategy = "group" if layer.weight_spec.granularity == "group" else "channel"
    return {**args, "symmetric": False, "strategy": strategy, "zp_dtype": str(REAL_ZERO_DTYPE)}


@torch.no_grad()
def compress_real_zero(layer: IntLinear, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One weight-only IntLinear (with or without an offset) as a naive-quantized layer with a float zero point."""
    if layer.act_spec is not None:
        raise FormatError(f"{name}: a real-valued zero point with quantized activations has no kernel in any reader; "
                          "merge QA-LoRA adapters into weight-only (a16) layers")
    half = 1 << (layer.bits - 1)
    codes, zero = layer.unsigned_codes()
    scale = layer.scale.double()
    # compressed-tensors' signed convention: code and zero point both less 2^(b-1).
    z = torch.full_like(scale, 0.0) if zero is None else zero.double() - half
    if layer.offset is not None:
        off = layer.offset.double()
        if bool(((scale == 0) & (off != 0)).any()):
            raise FormatError(f"{name}: a group with scale 0 has a nonzero offset, which no zero point represents; "
                              "this merge cannot be written with real zero points (write format version 2: "
                              "convert_model(..., real_zero=False))")
        z = z - torch.where(scale == 0, torch.zeros_like(off), off / scale)
    out = {"weight": (codes.to(torch.int16) - half).to(torch.int8).contiguous(),
           "weight_scale": layer.scale.contiguous(),
           "weight_zero_point": z.to(REAL_ZERO_DTYPE).contiguous()}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().contiguous()
    scheme = {"weights": real_zero_args(layer, name), "input_activations": None, "output_activations": None,
              "format": REAL_ZERO_FORMAT}
    return out, scheme


def split_real_zero(zp: torch.Tensor, scale: torch.Tensor, bits: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A float zero point z' (N, G) in compressed-tensors' signed convention as (the signed integer zero nearest it,
    int8; offset = (that zero - z') * scale, fp32): (code - zero) * scale + offset = (code - z') * scale."""
    if tuple(zp.shape) != tuple(scale.shape):
        raise FormatError(f"{name}.weight_zero_point: found {tuple(zp.shape)}, expected {tuple(scale.shape)}; the "
                          "checkpoint does not match its config")
    z = zp.double()
    if not bool(torch.isfinite(z).all()):
        raise FormatError(f"{name}.weight_zero_point holds inf or NaN; the checkpoint is corrupt: convert it again")
    half = 1 << (bits - 1)
    zi = z.round().clamp(-half, half - 1)  # any integer works; the nearest keeps the offset small
    return zi.to(torch.int8), ((zi - z) * scale.double()).to(torch.float32)

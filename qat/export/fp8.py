"""FP8 (e4m3) W8A8 checkpoints: the compressed-tensors `float-quantized` layout of a layer.

One converted layer holds `weight` as torch.float8_e4m3fn (out, in) and `weight_scale` as float32, (out, 1)
per channel or (1,) per tensor: what compressed-tensors' float-quantized decompressor and vLLM's
CompressedTensorsW8A8Fp8 read. The e4m3 codes are the fake quant's own (`qat.quantizers.fake_quant_values`:
clamp(w / s, -448, 448) cast to e4m3, with the scales of the layer's `WeightQuantizer`), so e4m3 * scale in
fp32 is the fake-quant weight bit for bit. The layer that runs them is `qat.runtime.fp8.Fp8Linear`.

Convertible fake-quant specs: fp8 weights per channel or per tensor with dynamic per-token fp8 activations
(`quant.scheme=fp8`). Others are refused with the reason (`qat.runtime.fp8.unsupported`): static activation
scales (the runtime has no input scale), dynamic per-tensor activations (vLLM would run them per token),
per-group weights, fp8 weights without fp8 activations.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..linear import QuantLinear
from ..quantizers import FP8_MAX, weight_rows
from ..runtime.fp8 import FP8, FP8_SUPPORTED, unsupported
from ..spec import TensorSpec
from .format import FormatError

__all__ = ["FLOAT_FORMAT", "fp8_scheme", "fp8_codes", "compress_fp8"]

FLOAT_FORMAT = "float-quantized"


def fp8_scheme(w: TensorSpec, a: Optional[TensorSpec], name: str) -> dict[str, Any]:
    """The config group (without targets) of an fp8 layer; FormatError for an fp8 spec the runtime lacks."""
    problem = unsupported(w, a)
    if problem is not None:
        raise FormatError(f"{name}: {problem}: {FP8_SUPPORTED}")
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": w.granularity, "dynamic": False,
               "group_size": None, "observer": "minmax"}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
            "group_size": None, "observer": None}
    return {"weights": weights, "input_activations": acts, "output_activations": None, "format": FLOAT_FORMAT}


def fp8_codes(weight: torch.Tensor, quantizer, spec: TensorSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes shaped like the (out, in) `weight`, fp32 scales: (1,) per tensor, (out, 1) per channel) from the
    weight's own `WeightQuantizer`, as its fake quant computes them."""
    with torch.no_grad():
        scale, _ = quantizer.qparams(weight)
        rows = weight_rows(weight, spec).float()
        # As fake_quant_values: clamp(w / s) to the e4m3 range, then the cast rounds to nearest even.
        codes = (rows / scale.detach().float()).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(weight.shape)
    scale = scale.detach().float()
    return codes.contiguous(), scale.reshape(1) if spec.granularity == "tensor" else scale.reshape(weight.shape[0], 1)


def compress_fp8(layer: QuantLinear, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The float-quantized tensors of one fp8 QuantLinear (e4m3 codes, fp32 scales, bias) and its scheme."""
    scheme = fp8_scheme(layer.weight_spec, layer.act_spec, name)
    codes, scale = fp8_codes(layer.weight.detach(), layer.weight_quantizer, layer.weight_spec)
    out = {"weight": codes, "weight_scale": scale.contiguous()}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().contiguous()
    return out, scheme

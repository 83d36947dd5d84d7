"""FP8 (e4m3) W8A8 checkpoints: the compressed-tensors `float-quantized` layout and `Fp8Linear`, its runtime.

One converted layer holds `weight` as torch.float8_e4m3fn (out, in) and `weight_scale` as float32, (out, 1)
per channel or (1,) per tensor: what compressed-tensors' float-quantized decompressor and vLLM's
CompressedTensorsW8A8Fp8 read. The e4m3 codes are the fake quant's own (`qat.quantizers.fake_quant_values`:
clamp(w / s, -448, 448) cast to e4m3, with the scales of the layer's `WeightQuantizer`), so e4m3 * scale in
fp32 is the fake-quant weight bit for bit. Activations are quantized per token at run time (dynamic), as the
fake-quant activation quantizer does: s = absmax / 448, clamp(x / s) cast to e4m3.

The matmul: `torch._scaled_mm` (fp8 tensor cores, fp32 accumulation, row-wise scales) on CUDA GPUs of
compute capability 8.9 or above; elsewhere, and wherever `_scaled_mm` refuses a shape, the reference: the
e4m3 codes cast to fp32, an fp32 matmul, times the activation and weight scales in fp32.

Convertible fake-quant specs: fp8 weights per channel or per tensor with dynamic per-token fp8 activations
(`quant.scheme=fp8`). Others are refused with the reason: static activation scales (the runtime has no input
scale), dynamic per-tensor activations (vLLM would run them per token), per-group weights, fp8 weights
without fp8 activations.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..device import device_path
from ..linear import QuantLinear
from ..quantizers import FP8_MAX, minmax_qparams, weight_rows
from ..spec import TensorSpec
from .format import FormatError
from .ops import kernels_enabled

__all__ = ["FP8", "Fp8Linear", "fp8_scheme", "compress_fp8", "quantize_act_fp8", "linear_fp8",
           "scaled_mm_supported"]

FP8 = torch.float8_e4m3fn
FLOAT_FORMAT = "float-quantized"
_ACT_SPEC = TensorSpec(bits=8, symmetric=True, granularity="token", format="fp8")


def fp8_scheme(w: TensorSpec, a: Optional[TensorSpec], name: str) -> dict[str, Any]:
    """The config group (without targets) of an fp8 layer; FormatError for an fp8 spec the runtime lacks."""
    supported = ("convert takes fp8 weights per channel or per tensor with dynamic per-token fp8 activations "
                 "(quant.scheme=fp8)")
    if w.format != "fp8" or w.granularity not in ("channel", "tensor"):
        raise FormatError(f"{name}: {w.format} weights per {w.granularity} with fp8 activations: {supported}")
    if a is None or a.format != "fp8":
        act = "no activation quantization" if a is None else f"{a.format} activations"
        raise FormatError(f"{name}: fp8 weights with {act}: {supported}")
    if not a.dynamic or a.granularity != "token":
        why = ("the runtime has no static input scale" if not a.dynamic else
               "vLLM would run dynamic per-tensor fp8 activations per token, not as trained")
        raise FormatError(f"{name}: fp8 activations {'static' if not a.dynamic else 'dynamic'} per "
                          f"{a.granularity} ({why}): {supported}")
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": w.granularity, "dynamic": False,
               "group_size": None, "observer": "minmax"}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True,
            "group_size": None, "observer": None}
    return {"weights": weights, "input_activations": acts, "output_activations": None, "format": FLOAT_FORMAT}


def compress_fp8(layer: QuantLinear, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The float-quantized tensors of one fp8 QuantLinear (e4m3 codes, fp32 scales, bias) and its scheme."""
    w_spec = layer.weight_spec
    scheme = fp8_scheme(w_spec, layer.act_spec, name)
    weight = layer.weight.detach()
    with torch.no_grad():
        scale, _ = layer.weight_quantizer.qparams(weight)
        rows = weight_rows(weight, w_spec).float()
        # As fake_quant_values: clamp(w / s) to the e4m3 range, then the cast rounds to nearest even.
        codes = (rows / scale.detach().float()).clamp(-FP8_MAX, FP8_MAX).to(FP8).reshape(weight.shape)
    scale = scale.detach().float().reshape(1 if w_spec.granularity == "tensor" else weight.shape[0], -1)
    out = {"weight": codes.contiguous(),
           "weight_scale": scale.reshape(1) if w_spec.granularity == "tensor" else scale.contiguous()}
    if layer.bias is not None:
        out["bias"] = layer.bias.detach().contiguous()
    return out, scheme


def quantize_act_fp8(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token e4m3 codes of a (M, K) activation and their fp32 scales (M, 1): the fake quant's."""
    r = x2d.float()
    scale, _ = minmax_qparams(r, _ACT_SPEC)
    return (r / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


_SCALED_MM_FAILED: set[tuple] = set()


def scaled_mm_supported(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether `torch._scaled_mm` may run this shape: CUDA, compute capability >= 8.9, K and N multiples of 16,
    no earlier failure for this (device, dtype), and not DISTQAT_INT_KERNELS=0 (which forces the reference)."""
    if not (device_path(x, "scaled_mm") and hasattr(torch, "_scaled_mm")) or k % 16 or n % 16 or not kernels_enabled():
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    return (x.device.index, x.dtype) not in _SCALED_MM_FAILED


def _linear_scaled_mm(xq, xs, qweight, scale, dtype) -> Optional[torch.Tensor]:
    try:
        return torch._scaled_mm(xq, qweight.t(), scale_a=xs.contiguous(), scale_b=scale.float().reshape(1, -1),
                                out_dtype=dtype)
    except (RuntimeError, TypeError) as e:  # an older torch, a dtype or shape its kernels do not take
        _SCALED_MM_FAILED.add((xq.device.index, dtype))
        warnings.warn(f"torch._scaled_mm refused an fp8 linear ({str(e).splitlines()[0]}); using the fp32 "
                      "reference for this dtype from now on", RuntimeWarning, stacklevel=3)
        return None


def linear_fp8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               impl: Optional[str] = None) -> torch.Tensor:
    """y = x @ W^T + bias with x quantized per token to e4m3, W = e4m3 codes * scale (N, 1); (..., K) -> (..., N).

    impl: None picks `scaled_mm` where `scaled_mm_supported`, else `reference`."""
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the layer takes {k}")
    x2 = x.reshape(-1, k)
    out_shape = (*x.shape[:-1], n)
    xq, xs = quantize_act_fp8(x2)
    scale = scale.reshape(n, 1)
    if impl is None:
        impl = "scaled_mm" if scaled_mm_supported(x, n, k) else "reference"
    y = _linear_scaled_mm(xq, xs, qweight, scale, x.dtype) if impl == "scaled_mm" else None
    if y is None:
        y = (xq.float() @ qweight.float().t()) * xs * scale.float().reshape(1, n)
    if bias is not None:
        y = y.float() + bias.float()
    return y.to(x.dtype).reshape(out_shape)


class Fp8Linear(nn.Module):
    """y = x @ W^T + b with W = e4m3 codes * scale (per channel or per tensor) and x quantized per token to e4m3."""

    def __init__(self, in_features: int, out_features: int, weight_spec: TensorSpec, act_spec: Optional[TensorSpec],
                 bias: bool, dtype: torch.dtype = torch.bfloat16, device: Optional[torch.device] = None) -> None:
        super().__init__()
        fp8_scheme(weight_spec, act_spec, "Fp8Linear")
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @torch.no_grad()
    def load_compressed(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        """Fill the buffers from one layer's float-quantized entries, checking every shape and dtype."""
        n, k = self.out_features, self.in_features

        def need(key: str) -> torch.Tensor:
            if key not in tensors:
                raise FormatError(f"{name}: the checkpoint lacks {name}.{key}; it is incomplete or not "
                                  "written by distqat convert")
            return tensors[key]

        w, s = need("weight"), need("weight_scale")
        if tuple(w.shape) != (n, k) or w.dtype != FP8:
            raise FormatError(f"{name}.weight: found {tuple(w.shape)} {w.dtype}, expected {(n, k)} {FP8}; "
                              "the checkpoint does not match its config")
        per_tensor = self.weight_spec.granularity == "tensor"
        if s.dtype != torch.float32 or s.numel() != (1 if per_tensor else n):
            raise FormatError(f"{name}.weight_scale: found {tuple(s.shape)} {s.dtype}, expected "
                              f"{(1,) if per_tensor else (n, 1)} torch.float32; the checkpoint does not match its "
                              "config")
        if "weight_zero_point" in tensors:
            raise FormatError(f"{name}: an fp8 layer has no zero point; the checkpoint does not match its config")
        self.qweight = w.contiguous()
        self.scale = s.reshape(-1, 1).expand(n, 1).contiguous()
        if self.bias is not None:
            bias = need("bias")
            if tuple(bias.shape) != (n,):
                raise FormatError(f"{name}.bias: found {tuple(bias.shape)}, expected {(n,)}")
            self.bias.data = bias.to(self.bias.dtype)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """e4m3 * scale in fp32 (the fake-quant weight bit for bit), cast to `dtype`."""
        return (self.qweight.float() * self.scale.float()).to(dtype or torch.float32)

    def compressed(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This layer's float-quantized tensors and scheme, the inverse of `load_compressed`."""
        scheme = fp8_scheme(self.weight_spec, self.act_spec, name)
        scale = self.scale[:1].reshape(1) if self.weight_spec.granularity == "tensor" else self.scale
        out = {"weight": self.qweight.contiguous(), "weight_scale": scale.contiguous()}
        if self.bias is not None:
            out["bias"] = self.bias.detach().contiguous()
        return out, scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_fp8(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3 {self.weight_spec.granularity}, a fp8 token"


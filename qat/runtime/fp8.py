"""FP8 (e4m3) W8A8 layers at run time: `Fp8Linear` and its matmul.

One layer holds `qweight` as torch.float8_e4m3fn (out, in) and `scale` as float32 (out, 1), per channel or
one scale repeated per tensor: the fake quant's own e4m3 codes (`qat.quantizers.fake_quant_values`: clamp(w / s,
-448, 448) cast to e4m3), so e4m3 * scale in fp32 is the fake-quant weight bit for bit. Activations are quantized
per token at run time (dynamic), as the fake-quant activation quantizer does: s = absmax / 448, clamp(x / s) cast to
e4m3. Reading and writing the compressed-tensors `float-quantized` layout is `qat.export.fp8` and
`qat.export.layers`.

The matmul: `torch._scaled_mm` (fp8 tensor cores, fp32 accumulation, row-wise scales) on CUDA GPUs of
compute capability 8.9 or above; elsewhere, and wherever `_scaled_mm` refuses a shape, the reference: the
e4m3 codes cast to fp32, an fp32 matmul, times the activation and weight scales in fp32.

The layer runs fp8 weights per channel or per tensor with dynamic per-token fp8 activations; `unsupported`
names what it does not run (static activation scales: no input scale; dynamic per-tensor activations: vLLM would
run them per token; per-group weights; fp8 weights without fp8 activations).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..device import device_path
from ..quantizers import FP8_MAX, minmax_qparams
from ..spec import TensorSpec
from .int_kernels import kernels_enabled

__all__ = ["FP8", "FP8_SUPPORTED", "Fp8Linear", "unsupported", "quantize_act_fp8", "linear_fp8",
           "scaled_mm_supported"]

FP8 = torch.float8_e4m3fn
_ACT_SPEC = TensorSpec(bits=8, symmetric=True, granularity="token", format="fp8")
FP8_SUPPORTED = ("convert takes fp8 weights per channel or per tensor with dynamic per-token fp8 activations "
                 "(quant.scheme=fp8)")


def unsupported(w: TensorSpec, a: Optional[TensorSpec]) -> Optional[str]:
    """What about an fp8 layer's specs `Fp8Linear` does not run, or None when it runs them."""
    if w.format != "fp8" or w.granularity not in ("channel", "tensor"):
        return f"{w.format} weights per {w.granularity} with fp8 activations"
    if a is None or a.format != "fp8":
        act = "no activation quantization" if a is None else f"{a.format} activations"
        return f"fp8 weights with {act}"
    if not a.dynamic or a.granularity != "token":
        why = ("the runtime has no static input scale" if not a.dynamic else
               "vLLM would run dynamic per-tensor fp8 activations per token, not as trained")
        return f"fp8 activations {'static' if not a.dynamic else 'dynamic'} per {a.granularity} ({why})"
    return None


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
        problem = unsupported(weight_spec, act_spec)
        if problem is not None:
            raise ValueError(f"Fp8Linear: {problem}: {FP8_SUPPORTED}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """e4m3 * scale in fp32 (the fake-quant weight bit for bit), cast to `dtype`."""
        return (self.qweight.float() * self.scale.float()).to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_fp8(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3 {self.weight_spec.granularity}, a fp8 token"


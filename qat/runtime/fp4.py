"""FP4 (e2m1) layers at run time: `Fp4Linear`, NVFP4 or MXFP4 weights with optional fp4 activations.

One layer holds, as compressed-tensors' `nvfp4-pack-quantized` / `mxfp4-pack-quantized` store them:
- `qweight` uint8 (out, in / 2): two e2m1 codes per byte, the low nibble first, code = sign << 3 | magnitude index;
- `scale` (out, in / block): NVFP4 e4m3 block scales (torch.float8_e4m3fn, blocks of 16), MXFP4 e8m0 biased
  exponents (uint8, blocks of 32);
- `global_scale` fp32 (1,) for NVFP4 (a power of two G; a block's effective scale is s / G), None for MXFP4.

The weight is e2m1 value * effective block scale in fp32, which is the fake-quant weight bit for bit (`qat.fp4`: the
product of an e2m1 value and an e4m3 or power-of-two scale has at most 6 significant bits, so it is exact in fp32
and in bf16). The forward dequantizes the weight to the input's dtype, fake-quantizes the input with the very
`ActQuantizer` the QAT model used (`qat.quantizers`: dynamic fp4 blocks along the reduction dimension, NVFP4 with a
power-of-two scale per token) and runs one matmul: on CPU and on GPUs alike, the same ops as the fake-quant layer,
so the logits are the fake-quant model's. FP4 tensor cores (Blackwell) are not used: no such GPU was measured.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..fp4 import FP4_BLOCK, fp4_values, pow2
from ..quantizers import ActQuantizer
from ..spec import FP4_FORMATS, TensorSpec

__all__ = ["Fp4Linear", "FP4_SUPPORTED", "fp4_unsupported", "pack_fp4", "unpack_fp4", "fp4_block_scales"]

FP4_SUPPORTED = ("convert takes nvfp4 or mxfp4 weights (blocks of 16 / 32) with the same format's dynamic block "
                 "activations or none (quant.scheme=nvfp4, mxfp4, wnvfp4, wmxfp4)")
SCALE_DTYPES = {"nvfp4": torch.float8_e4m3fn, "mxfp4": torch.uint8}


def fp4_unsupported(w: TensorSpec, a: Optional[TensorSpec]) -> Optional[str]:
    """What about an fp4 layer's specs `Fp4Linear` does not run, or None when it runs them."""
    if w.format not in FP4_FORMATS or (w.granularity, w.group_size) != ("group", FP4_BLOCK[w.format]):
        return f"{w.format} weights per {w.granularity} {w.group_size or ''}".strip()
    if a is not None and (a.format != w.format or not a.dynamic or a.group_size != w.group_size):
        return f"{w.format} weights with {a.format} {'dynamic' if a.dynamic else 'static'} activations"
    return None


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) 4-bit codes -> (N, K / 2) uint8, the even column in the low nibble (compressed-tensors' order)."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K / 2) uint8 -> (N, K) int32 codes."""
    p = packed.to(torch.int32)
    return torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).reshape(p.shape[0], -1)


def fp4_block_scales(fmt: str, scale: torch.Tensor, global_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The effective fp32 block scales (N, K / block) of stored ones: s / G (NVFP4) or 2^(e - 127) (MXFP4)."""
    if fmt == "mxfp4":
        return pow2(scale.to(torch.int32) - 127)
    return scale.float() / global_scale.float().reshape(1, 1)


class Fp4Linear(nn.Module):
    """y = Qa(x) @ W^T + b with W = e2m1 codes * block scales (NVFP4 or MXFP4) and Qa the fake-quant fp4 input."""

    def __init__(self, in_features: int, out_features: int, weight_spec: TensorSpec, act_spec: Optional[TensorSpec],
                 bias: bool, dtype: torch.dtype = torch.bfloat16, device: Optional[torch.device] = None) -> None:
        super().__init__()
        problem = fp4_unsupported(weight_spec, act_spec)
        if problem is not None:
            raise ValueError(f"Fp4Linear: {problem}: {FP4_SUPPORTED}")
        fmt, block = weight_spec.format, weight_spec.group_size
        if in_features % block:
            raise ValueError(f"Fp4Linear: {fmt} blocks of {block} do not divide in_features={in_features}")
        self.in_features, self.out_features, self.format = in_features, out_features, fmt
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, in_features // block, dtype=SCALE_DTYPES[fmt],
                                                  device=device))
        self.register_buffer("global_scale", torch.ones(1, dtype=torch.float32, device=device)
                             if fmt == "nvfp4" else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.input_quantizer = ActQuantizer(act_spec) if act_spec is not None else None

    def block_scales(self) -> torch.Tensor:
        return fp4_block_scales(self.format, self.scale, self.global_scale)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """e2m1 value * effective block scale in fp32 (the fake-quant weight bit for bit), cast to `dtype`."""
        n, k, g = self.out_features, self.in_features, self.weight_spec.group_size
        w = fp4_values(unpack_fp4(self.qweight)).reshape(n, k // g, g) * self.block_scales().unsqueeze(-1)
        return w.reshape(n, k).to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer takes {self.in_features}")
        xq = self.input_quantizer(x) if self.input_quantizer is not None else x
        return F.linear(xq, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        act = "a16" if self.act_spec is None else f"a {self.format}"
        return f"in={self.in_features}, out={self.out_features}, {self.format} e2m1, {act}"

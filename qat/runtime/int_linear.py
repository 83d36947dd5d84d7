"""IntLinear: the runtime module of a converted layer (integer weights, optional int8 activations).

Weights stay in integer form in memory: 4-bit (and 2/3/5/6/7-bit) codes packed into int32 words as on
disk, 8-bit codes as int8. The matmul is `qat.runtime.ops` (Triton kernels on CUDA, an exact integer
reference on CPU), which also decides per shape which implementation runs. Reading and writing a layer's
compressed-tensors entries is the format's (`qat.export.layers`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..quantizers import ActQuantizer
from ..spec import TensorSpec
from . import ops
from .pack import packed_cols, unpack_int32


class IntLinear(nn.Module):
    """y = x @ W^T + b with W = (codes - zero) * scale per group; x quantized per token to int8 when a8."""

    def __init__(
        self, in_features: int, out_features: int, weight_spec: TensorSpec, act_spec: Optional[TensorSpec],
        bias: bool, dtype: torch.dtype = torch.bfloat16, device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.bits = weight_spec.bits
        g = weight_spec.group_size if weight_spec.granularity == "group" else in_features
        self.group_size = g
        n_groups = 1 if weight_spec.granularity in ("channel", "tensor") else in_features // g
        if self.bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, packed_cols(in_features, self.bits),
                                                        dtype=torch.int32, device=device))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=dtype, device=device))
        zdt = torch.int8 if self.bits == 8 else torch.uint8
        self.register_buffer("zero", None if weight_spec.symmetric else
                             torch.zeros(out_features, n_groups, dtype=zdt, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        # The real-valued part of the zero point in weight units (format version 2, a QA-LoRA merge):
        # W = (code - zero) * scale + offset, constant on each (row, group) block.
        self.register_buffer("offset", None)
        # 4-bit activations have no integer GEMM here: the input is fake-quantized by the training quantizer itself
        # (per-token int4 codes times their scale, in the input's dtype) and meets the dequantized weight.
        self.input_quantizer = ActQuantizer(act_spec) if act_spec is not None and act_spec.bits != 8 else None

    @property
    def act_symmetric(self) -> Optional[bool]:
        return None if self.act_spec is None else self.act_spec.symmetric

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return ops.dequantize_weight(self.qweight, self.scale, self.zero, self.bits, self.group_size,
                                     self.in_features, dtype or self.scale.dtype)

    def unsigned_codes(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(N, K) unsigned codes and (N, G) unsigned zero points (or None), as compressed-tensors stores them."""
        if self.bits == 8:
            half = 128
            zero = None if self.zero is None else self.zero.to(torch.int16) + half
            return self.qweight.to(torch.int16) + half, zero
        return unpack_int32(self.qweight, self.bits, self.in_features), self.zero

    def offset_term(self, x: torch.Tensor) -> torch.Tensor:
        """x @ offset^T over weight groups: the offset is constant on each group, so each group's input sums."""
        sums = x.reshape(*x.shape[:-1], -1, self.group_size).sum(-1)
        return sums.to(self.offset.dtype) @ self.offset.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.act_spec is None or self.input_quantizer is not None:
            y = ops.linear_a16(x, self.qweight, self.scale, self.zero, self.bits, self.group_size,
                               self.in_features, bias=self.bias)
            return y if self.offset is None else y + self.offset_term(x).to(y.dtype)
        return ops.linear_a8(x, self.qweight, self.scale, self.zero, self.bits, self.group_size,
                             self.in_features, act_symmetric=self.act_spec.symmetric, bias=self.bias)

    def extra_repr(self) -> str:
        w = self.weight_spec
        gran = f"g{w.group_size}" if w.granularity == "group" else w.granularity
        act = "a16" if self.act_spec is None else \
            f"a{self.act_spec.bits}{'' if self.act_spec.symmetric else ' asym'}"
        return (f"in={self.in_features}, out={self.out_features}, int{self.bits} {gran}"
                f"{'' if w.symmetric else ' asym'}, {act}{', real zero' if self.offset is not None else ''}")

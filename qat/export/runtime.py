"""IntLinear: the runtime module of a converted layer (integer weights, optional int8 activations).

Weights stay in integer form in memory: 4-bit (and 2/3/5/6/7-bit) codes packed into int32 words as on
disk, 8-bit codes as int8. The matmul is `qat.export.ops` (Triton kernels on CUDA, an exact integer
reference on CPU), which also decides per shape which implementation runs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..spec import TensorSpec
from . import ops
from .format import FormatError, compress
from .pack import pack_int32, packed_cols, unpack_int32


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

    @property
    def act_symmetric(self) -> Optional[bool]:
        return None if self.act_spec is None else self.act_spec.symmetric

    @torch.no_grad()
    def load_compressed(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        """Fill the buffers from the compressed-tensors entries of one layer, checking every shape."""
        n, k, b = self.out_features, self.in_features, self.bits

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
        check("weight_scale", scale, self.scale.shape, (torch.bfloat16, torch.float16, torch.float32))
        self.scale = scale.contiguous()
        zp = tensors.get("weight_zero_point")
        if (zp is None) != self.weight_spec.symmetric:
            raise FormatError(f"{name}: zero points {'missing' if zp is None else 'present'} but the config "
                              f"declares symmetric={self.weight_spec.symmetric}")
        if "weight_packed" in tensors:
            packed = need("weight_packed")
            check("weight_packed", packed, (n, packed_cols(k, b)), (torch.int32,))
            shape = need("weight_shape")
            if [int(v) for v in shape] != [n, k]:
                raise FormatError(f"{name}.weight_shape is {shape.tolist()}, the model needs {[n, k]}")
            if b == 8:
                self.qweight = (unpack_int32(packed, b, k).to(torch.int16) - 128).to(torch.int8)
            else:
                self.qweight = packed.contiguous()
            if zp is not None:
                ng = self.scale.shape[1]
                if zp.dtype == torch.int32 and zp.dim() == 2 and zp.shape[1] == ng:
                    z = unpack_int32(zp.t().contiguous(), b, n).t()  # packed along the output dim
                else:
                    z = (zp.to(torch.int16) + (1 << (b - 1))).reshape(-1, 1).expand(n, ng)
                self.zero = (z.to(torch.int16) - 128).to(torch.int8) if b == 8 else z.to(torch.uint8).contiguous()
        else:
            w = need("weight")  # int-quantized: signed codes as int8 whatever the width
            check("weight", w, (n, k), (torch.int8,))
            half = 1 << (b - 1)
            if b != 8 and w.numel() and (int(w.min()) < -half or int(w.max()) >= half):
                raise FormatError(f"{name}.weight holds codes outside the {b}-bit range [{-half}, {half - 1}] "
                                  "its config declares; the checkpoint does not match its config")
            self.qweight = w.contiguous() if b == 8 else pack_int32(w.to(torch.int32) + half, b)
            if zp is not None:
                z = zp.to(torch.int8).reshape(-1, 1).expand(n, 1) if zp.numel() == 1 else zp.reshape(n, -1)
                check("weight_zero_point", z, self.scale.shape, (torch.int8,))
                self.zero = z.contiguous() if b == 8 else (z.to(torch.int16) + half).to(torch.uint8).contiguous()
        offset = tensors.get("weight_offset")
        if offset is not None:
            check("weight_offset", offset, self.scale.shape, (torch.bfloat16, torch.float16, torch.float32))
            if self.act_spec is not None:
                raise FormatError(f"{name}: a real-valued zero point (weight_offset) with int8 activations has "
                                  "no kernel; merge QA-LoRA adapters into weight-only (a16) layers")
            self.offset = offset.contiguous()
        if self.bias is not None:
            bias = need("bias")
            if tuple(bias.shape) != (n,):
                raise FormatError(f"{name}.bias: found {tuple(bias.shape)}, expected {(n,)}; the checkpoint "
                                  "does not match its config")
            self.bias.data = bias.to(self.bias.dtype)

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

    def compressed(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """This layer's compressed-tensors tensors and scheme, the inverse of `load_compressed`."""
        codes, zero = self.unsigned_codes()
        out, scheme = compress(codes, self.scale, zero, self.weight_spec, self.act_spec, self.bias, name,
                               self.scale.dtype)
        if self.offset is not None:
            out["weight_offset"] = self.offset.contiguous()
        return out, scheme

    def offset_term(self, x: torch.Tensor) -> torch.Tensor:
        """x @ offset^T over weight groups: the offset is constant on each group, so each group's input sums."""
        sums = x.reshape(*x.shape[:-1], -1, self.group_size).sum(-1)
        return sums.to(self.offset.dtype) @ self.offset.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is None:
            y = ops.linear_a16(x, self.qweight, self.scale, self.zero, self.bits, self.group_size,
                               self.in_features, bias=self.bias)
            return y if self.offset is None else y + self.offset_term(x).to(y.dtype)
        return ops.linear_a8(x, self.qweight, self.scale, self.zero, self.bits, self.group_size,
                             self.in_features, act_symmetric=self.act_spec.symmetric, bias=self.bias)

    def extra_repr(self) -> str:
        w = self.weight_spec
        gran = f"g{w.group_size}" if w.granularity == "group" else w.granularity
        act = "a16" if self.act_spec is None else f"a8{'' if self.act_spec.symmetric else ' asym'}"
        return (f"in={self.in_features}, out={self.out_features}, int{self.bits} {gran}"
                f"{'' if w.symmetric else ' asym'}, {act}{', real zero' if self.offset is not None else ''}")

"""QuantLinear: an nn.Linear whose weight and input are fake-quantized in forward.

It subclasses nn.Linear so peft (LoRA on top), DeepSpeed and state_dict treat it as a Linear; the
weight Parameter is shared with the Linear it replaces, not copied.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActQuantizer, WeightQuantizer
from .spec import TensorSpec


class QuantLinear(nn.Linear):
    """y = Qa(x) @ Qw(W)^T + b, with STE gradients to x and W (and learned quantizer parameters)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_spec: Optional[TensorSpec] = None,
        act_spec: Optional[TensorSpec] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quantizers(weight_spec, act_spec)

    def _init_quantizers(self, weight_spec: Optional[TensorSpec], act_spec: Optional[TensorSpec]) -> None:
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.weight_quantizer = WeightQuantizer(weight_spec, self.weight) if weight_spec else None
        self.input_quantizer = ActQuantizer(act_spec) if act_spec else None
        if self.weight_quantizer is not None:
            self.weight_quantizer.to(self.weight.device)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weight_spec: Optional[TensorSpec], act_spec: Optional[TensorSpec] = None
    ) -> QuantLinear:
        """Wrap an existing Linear, sharing its weight and bias Parameters."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = linear.in_features, linear.out_features
        q.weight, q.bias = linear.weight, linear.bias
        q._init_quantizers(weight_spec, act_spec)
        return q

    def to_linear(self, fake_quantized: bool = False) -> nn.Linear:
        """A plain Linear with the same (shared) weight, or with the fake-quantized weight baked in."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        if fake_quantized:
            with torch.no_grad():
                lin.weight.copy_(self.quantized_weight())
                if self.bias is not None:
                    lin.bias.copy_(self.bias)
        else:
            lin.weight, lin.bias = self.weight, self.bias
        return lin

    def quantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        batch = None if torch.compiler.is_compiling() else self.__dict__.get("weight_batch")
        if batch is not None:  # qat.fast's weight_batch: quantized in one call with its layer's others
            wq = batch.take(self, dtype)
            if wq is not None:
                return wq
        w = self.weight if dtype is None else self.weight.to(dtype)
        return self.weight_quantizer(w) if self.weight_quantizer is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = None
        if torch.is_autocast_enabled(x.device.type):
            # Quantize in the dtype the matmul will see, so scales and codes match a bf16 deployment.
            dt = torch.get_autocast_dtype(x.device.type)
        return F.linear(self.quantized_input(x, dt), self.quantized_weight(dt), self.bias)

    def quantized_input(self, x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """x cast to `dtype` and fake-quantized; reused from the model's SharedInput when a sibling linear
        (q/k/v, gate/up) quantized this very tensor just before."""
        q = self.input_quantizer
        memo = getattr(q, "shared", None) if q is not None and not torch.compiler.is_compiling() else None
        if memo is not None:
            hit = memo.get(x, q.spec, dtype)
            if hit is not None:
                return hit
        xq = x if dtype is None else x.to(dtype)
        if q is not None:
            xq = q(xq)
        if memo is not None:
            memo.put(x, q.spec, dtype, xq)
        return xq


class SharedInput:
    """A one-slot memo shared by a model's dynamic activation quantizers, so that linears reading the
    same tensor (q/k/v after the attention norm, gate/up after the MLP norm) fake-quantize it once.

    A dynamic scale depends on the input alone, so the reuse is exact, and sharing the output also
    sums the gradients of its readers before the STE instead of after it. The slot keeps the input
    itself alive, so an identity match cannot be a recycled id; the tensor's version catches in-place
    changes. `quantize_model` installs one per model and clears it after each model forward.
    """

    __slots__ = ("x", "version", "key", "out")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.x: Optional[torch.Tensor] = None
        self.out: Optional[torch.Tensor] = None
        self.version, self.key = -1, None

    def get(self, x: torch.Tensor, spec: TensorSpec, dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
        if self.x is x and self.version == x._version and self.key == (spec, dtype, torch.is_grad_enabled()):
            return self.out
        return None

    def put(self, x: torch.Tensor, spec: TensorSpec, dtype: Optional[torch.dtype], out: torch.Tensor) -> None:
        self.x, self.out, self.version = x, out, x._version
        self.key = (spec, dtype, torch.is_grad_enabled())


class ClearShared:
    """Forward hook that empties a SharedInput once the model's forward returns (frees the slot)."""

    def __init__(self, memo: SharedInput) -> None:
        self.memo = memo

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.memo.clear()

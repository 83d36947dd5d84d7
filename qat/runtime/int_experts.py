"""IntExperts: a fused experts module (transformers 5 `*Experts`) that computes from stored integer or fp8 codes.

The runtime twin of `qat.experts.QuantExperts`: `IntExperts.wrap` swaps the module's class for a subclass, so the
model's router, its MoE block and the module's own `act_fn` / `_apply_gate` stay the model's code, and drops the
float stacked weights for per-expert codes and scales stacked along a leading expert dimension:

- `<param>_qweight`: (E, N, K) int8 for 8-bit codes, (E, N, ceil(K*bits/32)) int32 packed codes below 8 bits,
  (E, N, K) float8_e4m3fn for fp8; `<param>_scale` (E, N, G) (fp32 for fp8); `<param>_zero` (E, N, G) or None.

Each expert's slice is exactly an `IntLinear` (or `Fp8Linear`) layout, and the forward runs each routed expert
through the same ops those layers use (`qat.runtime.ops.linear_a16` / `linear_a8`, `qat.runtime.fp8.linear_fp8`):
the torch reference on CPU, the int kernels on CUDA. Biases (gpt-oss) stay the module's float parameters. The
loop mirrors `qat.experts.expert_loop` operation for operation, so a16 logits equal the fake-quant model's bit for
bit. A grouped kernel over all experts at once is left for later; the stacked layout is the one it would read.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..experts import ExpertsLayout, activate, routes
from ..spec import TensorSpec
from . import ops
from .fp8 import FP8, Fp8Linear, linear_fp8, unsupported
from .int_linear import IntLinear

__all__ = ["IntExperts", "ExpertLinear"]

ExpertLinear = Union[IntLinear, Fp8Linear]
Specs = dict[str, tuple[TensorSpec, Optional[TensorSpec]]]


class IntExperts(nn.Module):
    """The integer side of a fused experts module; `wrap` mixes it in front of the module's own class."""

    expert_layout: ExpertsLayout
    int_specs: Specs
    compute_dtype: torch.dtype
    _shapes: dict[str, tuple[int, int]]

    @classmethod
    def wrap(cls, module: nn.Module, layout: ExpertsLayout, specs: Specs, dtype: torch.dtype) -> nn.Module:
        """Replace the quantized stacked weights of `module` (described by `layout`) with zero codes and unit
        scales for `specs` ({param: (weight spec, input spec)}, every param of the layout); fill them with
        `set_expert`. `dtype` is the model's: the scales' dtype and the one the routed tokens compute in."""
        if isinstance(module, IntExperts):
            raise ValueError(f"{type(module).__name__} holds integer experts already")
        missing = [p for p in layout.params if p not in specs]
        if missing:
            raise ValueError(f"IntExperts needs a weight spec for every expert projection; {missing} have none")
        shapes = {}
        for p in layout.params:
            w = getattr(module, p)
            e, n, k = (w.shape[0], w.shape[2], w.shape[1]) if layout.transposed else tuple(w.shape)
            del module._parameters[p]
            shapes[p] = (n, k)
            wspec, aspec = specs[p]
            dev = w.device
            if wspec.format == "fp8":
                problem = unsupported(wspec, aspec)
                if problem is not None:
                    raise ValueError(f"IntExperts.{p}: {problem}")
                q = torch.zeros(e, n, k, dtype=FP8, device=dev)
                scale = torch.ones(e, n, 1, dtype=torch.float32, device=dev)
                zero = None
            else:
                probe = IntLinear(k, n, wspec, aspec, bias=False, dtype=dtype, device="meta")
                q = torch.zeros(e, *probe.qweight.shape, dtype=probe.qweight.dtype, device=dev)
                scale = torch.ones(e, *probe.scale.shape, dtype=dtype, device=dev)
                zero = None if probe.zero is None else torch.zeros(e, *probe.zero.shape, dtype=probe.zero.dtype,
                                                                   device=dev)
            module.register_buffer(f"{p}_qweight", q)
            module.register_buffer(f"{p}_scale", scale)
            module.register_buffer(f"{p}_zero", zero)
        module.__class__ = _int_class(type(module))
        module.expert_layout = layout
        module.int_specs = dict(specs)
        module.compute_dtype = dtype
        module._shapes = shapes
        return module

    def expert(self, param: str, e: int, rows: Optional[torch.Tensor] = None) -> ExpertLinear:
        """Expert `e`'s projection `param` (rows `rows` of its output, all when None) as a standalone IntLinear or
        Fp8Linear holding copies of its codes and scales: what the checkpoint stores per expert."""
        wspec, aspec = self.int_specs[param]
        n, k = self.out_in(param)
        idx = torch.arange(n) if rows is None else rows
        cls = Fp8Linear if wspec.format == "fp8" else IntLinear
        lin = cls(k, len(idx), wspec, aspec, bias=False, dtype=self.compute_dtype, device="cpu")
        lin.qweight = getattr(self, f"{param}_qweight")[e][idx].cpu().clone()
        lin.scale = getattr(self, f"{param}_scale")[e][idx].cpu().clone()
        zero = getattr(self, f"{param}_zero")
        if zero is not None:
            lin.zero = zero[e][idx].cpu().clone()
        return lin

    @torch.no_grad()
    def set_expert(self, param: str, e: int, rows: torch.Tensor, lin: ExpertLinear) -> None:
        """Copy a filled IntLinear / Fp8Linear (rows `rows` of expert `e`'s projection `param`) into the stack."""
        q = getattr(self, f"{param}_qweight")
        q[e, rows] = lin.qweight.to(q.device)
        # The stack holds the dtype the model loads in; a folder converted in another keeps its own on disk.
        scale = getattr(self, f"{param}_scale")
        scale[e, rows] = lin.scale.to(q.device, scale.dtype)
        zero = getattr(self, f"{param}_zero")
        if zero is not None:
            zero[e, rows] = lin.zero.to(q.device, zero.dtype)

    def out_in(self, param: str) -> tuple[int, int]:
        """(out, in) features of one expert's projection `param`."""
        return self._shapes[param]

    def dequantized_weight(self, param: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """(E, out, in): every expert's weight, the fake-quant weight bit for bit (tests and re-export use it)."""
        n = self.expert_layout.num_experts
        return torch.stack([self.expert(param, e).dequantized_weight(dtype or self.compute_dtype) for e in range(n)])

    def _linear(self, param: str, e: int, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        wspec, aspec = self.int_specs[param]
        q, s = getattr(self, f"{param}_qweight")[e], getattr(self, f"{param}_scale")[e]
        if wspec.format == "fp8":
            return linear_fp8(x, q, s, bias)
        zero = getattr(self, f"{param}_zero")
        z = None if zero is None else zero[e]
        k = self.out_in(param)[1]
        g = wspec.group_size if wspec.granularity == "group" else k
        if aspec is None:
            return ops.linear_a16(x, q, s, z, wspec.bits, g, k, bias=bias)
        return ops.linear_a8(x, q, s, z, wspec.bits, g, k, act_symmetric=aspec.symmetric, bias=bias)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        lay = self.expert_layout
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        index = top_k_index.reshape(x.shape[0], -1)
        routing = top_k_weights.reshape(x.shape[0], -1)
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        b_up = getattr(self, f"{lay.up}_bias") if lay.bias else None
        b_down = getattr(self, f"{lay.down}_bias") if lay.bias else None
        out = torch.zeros(x.shape, dtype=hidden_states.dtype, device=x.device)
        for e, token, slot in routes(index, lay.num_experts):
            h = self._linear(lay.up, e, x[token], None if b_up is None else b_up[e].to(self.compute_dtype))
            h = activate(self, h, lay)
            h = self._linear(lay.down, e, h, None if b_down is None else b_down[e].to(self.compute_dtype))
            if lay.post_norm:
                h = self.post_expert_norm(h)
            h = h * routing[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out.reshape(shape)

    def extra_repr(self) -> str:
        parts = []
        for p, (w, a) in self.int_specs.items():
            gran = f"g{w.group_size}" if w.granularity == "group" else w.granularity
            kind = "fp8" if w.format == "fp8" else f"int{w.bits}"
            act = "a16" if a is None else f"a8 {a.format}"
            parts.append(f"{p}: {kind} {gran}{'' if w.symmetric else ' asym'} {act}")
        return f"experts={self.expert_layout.num_experts}, " + ", ".join(parts)


_CLASSES: dict[type, type] = {}


def _int_class(own: type) -> type:
    if own not in _CLASSES:
        _CLASSES[own] = type(f"Int{own.__name__}", (IntExperts, own), {"_own_class": own})
    return _CLASSES[own]

"""Fake quantization with straight-through-estimator gradients: the reference numerics.

Everything that quantizes in distqat (QAT forward, PTQ, export) goes through `rows_qparams` and
`fake_quant`, so the codes a trained model used are the codes that ship. Tensors are handled as
"rows": a 2-D view with one scale (and zero point) per row, e.g. a weight of shape (out, in) with
group size g is viewed as (out * in / g, g).

Gradients:
- minmax scales with no learning (the default, LLM-QAT): nothing is clipped by construction, so the
  backward pass is the identity (`_STE`); this is also the path the fused CUDA kernels take.
- clipping scales (mse/percentile search, static or learned scales): round is the identity in
  backward, clamped values get zero gradient, and the scale gets the LSQ gradient
  (round(x/s) - x/s inside the range, qmin - z or qmax - z outside), from autograd on
  `_round_ste` + `clamp`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .device import device_path
from .fp4 import FP4_MAX, fp4_codes, fp4_round, fp4_scales, fp4_values, round_scale
from .kernels import fused_fake_quant_rows, fused_fp4_fake_quant_rows
from .spec import FP4_FORMATS, TensorSpec

# QLoRA's NormalFloat-4 levels (quantiles of N(0, 1) scaled to [-1, 1], with an exact zero).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
FP8_MAX = 448.0  # largest finite float8_e4m3fn
EPS = 1e-8  # smallest scale: an all-zero row quantizes to zeros instead of NaN


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in forward (bit for bit); gradient multiplied by g in backward (LSQ's step-size gradient scaling)."""
    y = x * g
    return x.detach() + (y - y.detach())


class _STE(torch.autograd.Function):
    """Returns the fake-quantized tensor; passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return xq

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g, None


def ste(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """`xq` in forward, identity gradient to `x` in backward."""
    return _STE.apply(x, xq)


# ---------------------------------------------------------------------------------------------
# Views: a tensor as rows that each own one scale.


def weight_rows(w: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """(out, in) weight -> rows: (1, out*in) per tensor, (out, in) per channel, (out*in/g, g) per group."""
    if spec.granularity == "tensor":
        return w.reshape(1, -1)
    if spec.granularity == "channel":
        return w.reshape(w.shape[0], -1)
    return w.reshape(-1, spec.group_size)


def act_rows(x: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """(..., C) activation -> rows: (1, N) per tensor, (tokens, C) per token, (tokens * C / g, g) per fp4 block."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "group":
        return x.reshape(-1, spec.group_size)
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------
# Scales and zero points.


def _round_to(scale: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Round scales to the dtype they will be stored in, so fake quant and export agree bit for bit."""
    if dtype is None or dtype == torch.float32:
        return scale
    # EPS underflows to 0 in fp16; the smallest positive value of the dtype keeps zero rows at zero.
    tiny = _TINY.get(dtype)
    if tiny is None:
        tiny = float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))
    return scale.to(dtype).float().clamp_min(tiny)


# Computed once: a tensor-to-float conversion per call would break a torch.compile graph at every quantizer.
_TINY = {dt: float(torch.nextafter(torch.zeros((), dtype=dt), torch.ones((), dtype=dt)))
         for dt in (torch.bfloat16, torch.float16)}


def range_qparams(
    lo: torch.Tensor, hi: torch.Tensor, spec: TensorSpec, scale_dtype: Optional[torch.dtype] = None,
    global_rows: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scale (and zero point) that map [lo, hi] onto the grid; fp32, one per row. fp4 block scales are the format's
    own stored values (qat.fp4), exact in any float dtype; `global_rows` blocks share an NVFP4 tensor scale (None:
    all)."""
    if spec.format in FP4_FORMATS:
        return fp4_scales(torch.maximum(lo.abs(), hi.abs()), spec.format, global_rows), None
    if spec.symmetric:
        if spec.format == "int" and spec.sym_range == "signed":
            return _round_to(spec.signed_scale(lo, hi).clamp_min(EPS), scale_dtype), None
        absmax = torch.maximum(lo.abs(), hi.abs())
        top = {"int": spec.q_range, "fp8": FP8_MAX, "nf4": 1.0}[spec.format]
        return _round_to((absmax / top).clamp_min(EPS), scale_dtype), None
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)  # keep 0 exactly representable (padding, ReLU zeros)
    scale = _round_to(((hi - lo) / spec.q_range).clamp_min(EPS), scale_dtype)
    zero = (-lo / scale).round().clamp(spec.qmin, spec.qmax)
    return scale, zero


def minmax_qparams(rows: torch.Tensor, spec: TensorSpec, scale_dtype: Optional[torch.dtype] = None,
                   global_rows: Optional[int] = None):
    r = rows.detach().float()
    return range_qparams(r.amin(-1, keepdim=True), r.amax(-1, keepdim=True), spec, scale_dtype, global_rows)


def percentile_qparams(rows: torch.Tensor, spec: TensorSpec, scale_dtype: Optional[torch.dtype] = None,
                       global_rows: Optional[int] = None):
    """Clip each row at its `spec.percentile`-th percentile (of |x| when symmetric)."""
    r = rows.detach().float()
    n = r.shape[-1]
    k = max(1, min(n, math.ceil(spec.percentile / 100.0 * n)))
    if spec.symmetric:
        hi = r.abs().kthvalue(k, dim=-1, keepdim=True).values
        return range_qparams(-hi, hi, spec, scale_dtype, global_rows)
    hi = r.kthvalue(k, dim=-1, keepdim=True).values
    lo = r.kthvalue(max(1, n - k + 1), dim=-1, keepdim=True).values
    return range_qparams(lo, hi, spec, scale_dtype)


@torch.no_grad()
def mse_qparams(
    rows: torch.Tensor, spec: TensorSpec, scale_dtype: Optional[torch.dtype] = None,
    grid: int = 20, max_shrink: float = 0.5, norm: float = 2.4, global_rows: Optional[int] = None,
):
    """Per row, the shrink of the min/max range (1.0 down to 1-max_shrink) with the least |x - Q(x)|^norm.

    The norm of 2.4 follows GPTQ's reference clipping search: it weighs large errors a bit more than MSE. For fp4
    each shrunk range is rounded to a storable block scale, so the search runs over the block-scale grid.
    """
    r = rows.float()
    lo0, hi0 = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
    best_err = torch.full_like(lo0, float("inf"))
    best_scale, best_zero = None, None
    for i in range(grid + 1):
        p = 1.0 - max_shrink * i / grid
        scale, zero = range_qparams(lo0 * p, hi0 * p, spec, scale_dtype, global_rows)
        err = (fake_quant_values(r, scale, zero, spec) - r).abs().pow(norm).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = zero if best_zero is None else torch.where(better, zero, best_zero)
    return best_scale, best_zero


QPARAMS = {"minmax": minmax_qparams, "percentile": percentile_qparams, "mse": mse_qparams}


# ---------------------------------------------------------------------------------------------
# Quantize / dequantize.


def quantize_codes(rows: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: TensorSpec):
    """The integer codes (int32) of the int and nf4 formats; what export packs."""
    r = rows.detach().float()
    if spec.format in FP4_FORMATS:
        return fp4_codes(fp4_round(r / scale))
    if spec.format == "nf4":
        levels = NF4_LEVELS.to(r.device)
        return (r / scale).unsqueeze(-1).sub(levels).abs().argmin(-1).to(torch.int32)
    if spec.format != "int":
        raise ValueError(f"format {spec.format} has no integer codes")
    q = (r / scale).round()
    if zero is not None:
        q = q + zero
    return q.clamp(spec.qmin, spec.qmax).to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: TensorSpec):
    if spec.format in FP4_FORMATS:
        return fp4_values(codes) * scale
    if spec.format == "nf4":
        return NF4_LEVELS.to(codes.device)[codes.long()] * scale
    q = codes.float()
    return (q - zero) * scale if zero is not None else q * scale


def fake_quant_values(rows: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: TensorSpec):
    """Quantize-dequantize in fp32, differentiable with clamp-aware STE (and LSQ scale gradients)."""
    r = rows.float()
    if spec.format == "fp8":
        y = (r / scale).clamp(-FP8_MAX, FP8_MAX)
        return ((y.to(torch.float8_e4m3fn).float() - y).detach() + y) * scale
    if spec.format in FP4_FORMATS:
        y = (r / scale).clamp(-FP4_MAX, FP4_MAX)  # saturated values get no gradient, as the int grid's
        return ((fp4_round(y.detach()) - y).detach() + y) * scale
    if spec.format == "nf4":
        levels = NF4_LEVELS.to(r.device)
        y = (r / scale).clamp(-1.0, 1.0)
        idx = y.detach().unsqueeze(-1).sub(levels).abs().argmin(-1)
        return ((levels[idx] - y).detach() + y) * scale
    # Clamp before rounding: a value half a step beyond the grid is clipped (zero gradient, LSQ's
    # qmax - z scale gradient) even though rounding alone would bring it back onto the grid.
    if zero is None:
        return _round_ste((r / scale).clamp(spec.qmin, spec.qmax)) * scale
    return _round_ste(torch.clamp(r / scale, spec.qmin - zero, spec.qmax - zero)) * scale


def fake_quant(
    rows: torch.Tensor, spec: TensorSpec, scale_dtype: Optional[torch.dtype] = None, use_kernel: bool = True,
    global_rows: Optional[int] = None,
) -> torch.Tensor:
    """Dynamic fake quant of rows with scales from `spec.scale_method`, in the dtype of `rows`.

    minmax scales clip nothing, so the gradient is the identity; clipping searches (and fp4's saturation) mask it.
    On the device path (`qat.device`) minmax int and fp4 rows take one fused kernel; `use_kernel=False`: the reference.
    """
    # Under torch.compile the reference ops below are traced instead: Inductor fuses them into the
    # producer of `rows`, which an opaque kernel launch would prevent.
    if (use_kernel and spec.scale_method == "minmax" and spec.format in ("int", *FP4_FORMATS)
            and device_path(rows, "fake_quant") and not torch.compiler.is_compiling()):
        out = (fused_fp4_fake_quant_rows(rows, spec.format, global_rows) if spec.format in FP4_FORMATS
               else fused_fake_quant_rows(rows, spec.bits, spec.symmetric, scale_dtype, spec.sym_range or "full"))
        if out is not None:  # fp4's carries its clamp-aware STE gradient
            return out if spec.format in FP4_FORMATS else ste(rows, out)
    scale, zero = QPARAMS[spec.scale_method](rows, spec, scale_dtype, global_rows=global_rows)
    if spec.scale_method == "minmax" and spec.format not in FP4_FORMATS:  # fp4 saturates: a clamp-aware STE
        with torch.no_grad():
            out = fake_quant_values(rows, scale, zero, spec).to(rows.dtype)
        return ste(rows, out)
    return fake_quant_values(rows, scale, zero, spec).to(rows.dtype)


# ---------------------------------------------------------------------------------------------
# Modules: what QuantLinear and the KV cache hold.


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight of fixed shape; holds the learned parameters when `spec.learnable` says so.

    lsq: `scale` (and `zero` when asymmetric) are parameters, initialised from the spec's scale method.
    lwc: `clip_hi` / `clip_lo` logits; the range is sigmoid(logit) * the row's max / min (OmniQuant).
    """

    def __init__(self, spec: TensorSpec, weight: torch.Tensor, global_rows: Optional[int] = None) -> None:
        super().__init__()
        self.spec = spec
        self.global_rows = global_rows  # blocks that share one NVFP4 tensor scale (None: the whole weight)
        rows = weight_rows(weight.detach(), spec)
        self.n_per_scale = rows.shape[-1]
        if spec.learnable == "lsq":
            scale, zero = QPARAMS[spec.scale_method](rows, spec, global_rows=global_rows)
            self.scale = nn.Parameter(scale)
            self.zero = nn.Parameter(zero) if zero is not None else None
        elif spec.learnable == "lwc":
            init = torch.full((rows.shape[0], 1), 4.0)  # sigmoid(4) ~ 0.982: start near minmax
            self.clip_hi = nn.Parameter(init.clone())
            self.clip_lo = nn.Parameter(init.clone()) if not spec.symmetric else None

    def qparams(self, weight: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """fp32 scale and zero point, one per row, rounded to the weight's dtype (what export stores)."""
        spec, rows = self.spec, weight_rows(weight, self.spec)
        if spec.learnable == "lsq":
            g = 1.0 / math.sqrt(self.n_per_scale * max(spec.qmax, 1))
            scale = _grad_scale(self.scale.clamp_min(EPS), g)
            if spec.format in FP4_FORMATS:
                return round_scale(scale, spec.format, self.global_rows), None
            scale = scale + (_round_to(scale.detach(), weight.dtype) - scale.detach())
            zero = None
            if self.zero is not None:
                zero = _round_ste(_grad_scale(self.zero, g)).clamp(spec.qmin, spec.qmax)
            return scale, zero
        if spec.learnable == "lwc":
            r = rows.float()
            if spec.symmetric and spec.sym_range == "signed":
                scale = torch.sigmoid(self.clip_hi) * spec.signed_scale(r.amin(-1, keepdim=True),
                                                                        r.amax(-1, keepdim=True))
            elif spec.symmetric:
                hi = torch.sigmoid(self.clip_hi) * r.abs().amax(-1, keepdim=True)
                scale = hi / spec.q_range
            else:
                hi = torch.sigmoid(self.clip_hi) * r.amax(-1, keepdim=True).clamp_min(0)
                lo = torch.sigmoid(self.clip_lo) * r.amin(-1, keepdim=True).clamp_max(0)
                scale = (hi - lo) / spec.q_range
            scale = scale.clamp_min(EPS)
            scale = scale + (_round_to(scale.detach(), weight.dtype) - scale.detach())
            zero = None if spec.symmetric else _round_ste(-lo / scale).clamp(spec.qmin, spec.qmax)
            return scale, zero
        return QPARAMS[spec.scale_method](rows, spec, weight.dtype, global_rows=self.global_rows)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.learnable == "none":
            return fake_quant(weight_rows(weight, spec), spec, weight.dtype,
                              global_rows=self.global_rows).reshape(weight.shape)
        scale, zero = self.qparams(weight)
        out = fake_quant_values(weight_rows(weight, spec), scale, zero, spec)
        return out.to(weight.dtype).reshape(weight.shape)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor):
        """(codes, scale, zero) with codes shaped like the weight and scale/zero as (out, n_groups)."""
        scale, zero = self.qparams(weight)
        codes = quantize_codes(weight_rows(weight, self.spec), scale, zero, self.spec)
        out = weight.shape[0]
        shape = (1, 1) if self.spec.granularity == "tensor" else (out, -1)
        return (codes.reshape(weight.shape), scale.detach().reshape(shape),
                None if zero is None else zero.detach().reshape(shape))

    def extra_repr(self) -> str:
        return _describe(self.spec)


class ActQuantizer(nn.Module):
    """Fake-quantizes activations (or K/V): dynamic per-token/per-tensor scales, or a calibrated static one.

    Static scales are observed (running absmax over calibration batches) while `observing` is True,
    then fixed by `finish_calibration`; with `learnable=lsq` the fixed scale then trains.
    """

    def __init__(self, spec: TensorSpec) -> None:
        super().__init__()
        self.spec = spec
        self.observing = False
        if not spec.dynamic:
            self.register_buffer("absmax", torch.zeros(1))
            if spec.learnable == "lsq":
                self.scale = nn.Parameter(torch.zeros(1))
            else:
                self.register_buffer("scale", torch.zeros(1))

    @torch.no_grad()
    def finish_calibration(self) -> None:
        self.observing = False
        scale, _ = range_qparams(-self.absmax, self.absmax, self.spec)
        self.scale.copy_(scale.reshape(1))

    def forward(self, x: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fake-quantize x; `rows` optionally gives the row view to use (kv per token/head)."""
        spec = self.spec
        r = act_rows(x, spec) if rows is None else rows
        if spec.dynamic:
            per_token = x.shape[-1] // spec.group_size if spec.granularity == "group" else None
            return fake_quant(r, spec, global_rows=per_token).reshape(x.shape)
        if self.observing:
            self.absmax.copy_(torch.maximum(self.absmax, x.detach().abs().amax().float()))
            return x
        if not bool(self.scale.detach().gt(0).all()):
            raise RuntimeError(
                "static activation scale is not calibrated; run qat.apply.calibrate(model, batches) first"
            )
        scale = self.scale.clamp_min(EPS)
        if spec.learnable == "lsq":
            scale = _grad_scale(scale, 1.0 / math.sqrt(r.numel() * spec.qmax))
        zero = None  # static scales are symmetric absmax scales
        return fake_quant_values(r, scale, zero, spec).to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        return _describe(self.spec)


def _describe(spec: TensorSpec) -> str:
    gran = f"group{spec.group_size}" if spec.granularity == "group" else spec.granularity
    fmt = f"int{spec.bits}" if spec.format == "int" else spec.format
    gran = "block" if spec.format in FP4_FORMATS else gran
    extra = [] if spec.symmetric else ["asym"]
    if spec.scale_method != "minmax":
        extra.append(spec.scale_method)
    if spec.learnable != "none":
        extra.append(spec.learnable)
    if not spec.dynamic:
        extra.append("static")
    return ", ".join([fmt, gran, *extra])


__all__ = [
    "WeightQuantizer", "ActQuantizer", "fake_quant", "fake_quant_values", "quantize_codes", "dequantize_codes",
    "minmax_qparams", "mse_qparams", "percentile_qparams", "range_qparams", "weight_rows", "act_rows", "ste",
]

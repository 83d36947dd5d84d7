"""The grid PTQ rounds onto (integer, nf4, fp8; fp4 block scales in `fp4grid.py`), and how a PTQ result is
frozen into a QuantLinear.

Every method ends in `freeze(qlinear, weight, scale, zero)`: the weight is written back already on
the grid (dequantized codes) and the layer's `lsq` weight quantizer gets the chosen scales and zero
points as its (saved) parameters, so fake quant of the stored weight gives back exactly the codes
the algorithm chose — at every forward, after save/load, and in export. A fused MoE experts parameter ends
in `freeze_experts` the same way, each expert's rows in turn.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..experts import QuantExperts
from ..fp4 import fp4_codes, fp4_round, round_scale
from ..linear import QuantLinear
from ..quantizers import QPARAMS, dequantize_codes, fake_quant_values, quantize_codes, weight_rows
from ..spec import QuantSpec, TensorSpec
from .fp4grid import fp4_qparams, is_fp4


def frozen_spec(spec: QuantSpec) -> QuantSpec:
    """The spec a PTQ model is saved with: weight scales (and zero points) as stored `lsq` parameters."""
    if spec.overrides:
        raise ValueError("ptq does not support quant.overrides (mixed precision) yet; quantize with one scheme")
    if spec.weight is None:
        return spec
    return replace(spec, weight=replace(spec.weight, learnable="lsq"))


def qparams(rows: torch.Tensor, spec: TensorSpec, scale_dtype: Optional[torch.dtype],
            nvfp4_exp: Optional[torch.Tensor] = None):
    """Scale (and zero) per row by the spec's scale method, rounded to the dtype the weight is stored in. fp4 block
    scales are the format's stored values over one NVFP4 tensor scale 2^nvfp4_exp (None: these rows' own, so pass
    every block of a weight at once), chosen in block-scale space by the clipping search (`fp4grid`)."""
    if is_fp4(spec):
        return fp4_qparams(rows, spec, nvfp4_exp)
    return QPARAMS[spec.scale_method](rows, spec, scale_dtype)


def quant_rows(rows: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], spec: TensorSpec):
    """(dequantized rows in rows' dtype, int32 codes or None for fp8)."""
    if spec.format == "fp8":
        return fake_quant_values(rows, scale, zero, spec).to(rows.dtype), None
    if is_fp4(spec):  # quantize_codes / dequantize_codes' values, without their slower nibble conversion
        y = fp4_round(rows.detach().float() / scale)
        return (y * scale).to(rows.dtype), fp4_codes(y)
    codes = quantize_codes(rows, scale, zero, spec)
    return dequantize_codes(codes, scale, zero, spec).to(rows.dtype), codes


def rtn(w: torch.Tensor, spec: TensorSpec, scale_dtype: Optional[torch.dtype] = None,
        nvfp4_exp: Optional[torch.Tensor] = None):
    """Round-to-nearest: (dequantized weight, codes, scale rows, zero rows)."""
    rows = weight_rows(w.detach().float(), spec)
    scale, zero = qparams(rows, spec, scale_dtype, nvfp4_exp)
    deq, codes = quant_rows(rows, scale, zero, spec)
    return deq.reshape(w.shape), None if codes is None else codes.reshape(w.shape), scale, zero


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): the squared output error of a linear over the inputs H = X^T X came from."""
    d = (wq - w).to(h.dtype)
    return float(((d @ h) * d).sum())


def check_storable(scale: torch.Tensor, spec: TensorSpec) -> None:
    """fp4 block scales the frozen quantizer keeps as they are (`qat.fp4.round_scale` over the whole weight, as the
    lsq quantizer rounds them), so fake quant gives back the PTQ weight bit for bit; RuntimeError otherwise."""
    if is_fp4(spec):
        s = scale.detach().reshape(-1, 1).float()
        if not torch.equal(round_scale(s, spec.format), s):
            raise RuntimeError(f"{spec.format} block scales of a PTQ result are not storable over one tensor scale; "
                               "compute them with qat.ptq.fp4grid over the whole weight")


@torch.no_grad()
def freeze(q: QuantLinear, weight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor]) -> None:
    """Store a PTQ result in q: the on-grid weight and the scales/zeros as the lsq quantizer's parameters."""
    wq = q.weight_quantizer
    if wq is None or wq.spec.learnable != "lsq":
        raise RuntimeError("freeze needs a QuantLinear with an lsq weight quantizer (see frozen_spec)")
    check_storable(scale, wq.spec)
    q.weight.copy_(weight.to(q.weight.dtype))
    wq.scale.data = scale.detach().reshape(-1, 1).float().to(q.weight.device).clone()
    if wq.zero is not None:
        wq.zero.data = zero.detach().reshape(-1, 1).float().to(q.weight.device).clone()


@torch.no_grad()
def freeze_experts(module: QuantExperts, param: str, weight: torch.Tensor, scale: torch.Tensor,
                   zero: Optional[torch.Tensor]) -> None:
    """`freeze` for one stacked parameter of a fused experts module: `weight` (E, out, in) whatever the storage,
    `scale` / `zero` the rows of every expert in turn (the stacked quantizer's (E*out, in) rows)."""
    wq = module.weight_quantizers[param] if param in module.weight_quantizers else None
    if wq is None or wq.spec.learnable != "lsq":
        raise RuntimeError("freeze_experts needs a QuantExperts parameter with an lsq weight quantizer (frozen_spec)")
    check_storable(scale, wq.spec)
    p = getattr(module, param)
    w = weight.reshape(module.canonical(param).shape)
    p.copy_((w.transpose(1, 2) if module.expert_layout.transposed else w).to(p.dtype))
    wq.scale.data = scale.detach().reshape(-1, 1).float().to(p.device).clone()
    if wq.zero is not None:
        wq.zero.data = zero.detach().reshape(-1, 1).float().to(p.device).clone()


def freeze_rtn(q: QuantLinear) -> torch.Tensor:
    """RTN-freeze q in place; returns the codes."""
    deq, codes, scale, zero = rtn(q.weight, q.weight_quantizer.spec, q.weight.dtype)
    freeze(q, deq, scale, zero)
    return codes

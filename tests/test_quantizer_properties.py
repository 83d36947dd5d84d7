"""Properties of qat.quantizers for every kind of weight spec: fake quant is idempotent and equals the
dequantized codes, codes stay in range, bf16 inputs quantize like fp32 ones to bf16 rounding, and
all-zero rows stay zero with finite gradients. The float64 reference tests are in test_quantizers.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers.quant_ref import (
    BF16,
    BITS,
    F64,
    rand_act,
    rand_weight,
    ref_act_rows,
    ref_codes,
    ref_minmax,
    ref_near_tie,
    seeded_gen,
    spec_id,
)

from qat.quantizers import (
    ActQuantizer,
    WeightQuantizer,
    dequantize_codes,
    fake_quant_values,
    quantize_codes,
    weight_rows,
)
from qat.spec import TensorSpec

# ---------------------------------------------------------------------------------------------
# Spec zoo for the property tests (idempotence, code range, zero rows).

PROPERTY_SPECS = [
    TensorSpec(bits=b, symmetric=sym, granularity=gran, group_size=grp)
    for b in BITS for sym in (True, False) for gran, grp in (("tensor", None), ("channel", None), ("group", 7))
] + [
    TensorSpec(bits=4, granularity="channel", scale_method="percentile", percentile=90.0),
    TensorSpec(bits=4, symmetric=False, granularity="group", group_size=7, scale_method="percentile", percentile=90.0),
    TensorSpec(bits=3, granularity="group", group_size=7, scale_method="mse"),
    TensorSpec(bits=3, symmetric=False, granularity="channel", scale_method="mse"),
    TensorSpec(bits=4, granularity="channel", learnable="lsq"),
    TensorSpec(bits=4, symmetric=False, granularity="group", group_size=7, learnable="lsq"),
    TensorSpec(bits=4, granularity="group", group_size=7, learnable="lwc"),
    TensorSpec(bits=4, symmetric=False, granularity="channel", learnable="lwc"),
    TensorSpec(bits=8, format="fp8", granularity="channel"),
    TensorSpec(bits=8, format="fp8", granularity="tensor"),
    TensorSpec(bits=4, format="nf4", granularity="group", group_size=7),
    TensorSpec(bits=4, format="nf4", granularity="channel"),
]
for _s in PROPERTY_SPECS:
    _s.check("weight")


def _quantizer(spec: TensorSpec, w: torch.Tensor) -> WeightQuantizer:
    """A WeightQuantizer whose learned parameters are moved off their init so that values clip."""
    q = WeightQuantizer(spec, w)
    g = seeded_gen("params", spec_id(spec))
    with torch.no_grad():
        if spec.learnable == "lsq":
            q.scale.mul_(0.6 + 0.3 * torch.rand(q.scale.shape, generator=g))
        elif spec.learnable == "lwc":
            q.clip_hi.copy_(torch.rand(q.clip_hi.shape, generator=g) * 3 - 1)
            if q.clip_lo is not None:
                q.clip_lo.copy_(torch.rand(q.clip_lo.shape, generator=g) * 3 - 1)
    return q


@pytest.mark.parametrize("spec", PROPERTY_SPECS, ids=spec_id)
def test_idempotent_and_dequant_of_codes(spec):
    w = rand_weight((6, 21), "idem", spec_id(spec))
    q = _quantizer(spec, w)
    with torch.no_grad():
        q1 = q(w)
        scale, zero = q.qparams(w)
        q2 = fake_quant_values(weight_rows(q1, spec), scale, zero, spec).reshape(w.shape)
        assert torch.equal(q2, q1)
        assert not torch.equal(q1, w)
        if spec.format != "fp8":
            codes = quantize_codes(weight_rows(w, spec), scale, zero, spec)
            assert torch.equal(dequantize_codes(codes, scale, zero, spec).reshape(w.shape), q1)
            assert torch.equal(quantize_codes(weight_rows(q1, spec), scale, zero, spec), codes)


@pytest.mark.parametrize("spec", [s for s in PROPERTY_SPECS if s.format == "int" and s.learnable == "none"],
                         ids=spec_id)
def test_idempotent_bf16(spec):
    """bf16 weights: re-quantizing the bf16 output with the same scales gives the same bf16 values.

    All-positive rows put asymmetric codes up to 2^b - 1, where (code - zero) * scale has more
    significant bits than bf16 holds.
    """
    w = (rand_weight((64, 21), "idem-bf16", spec_id(spec)).abs() * 3 + 0.01).to(BF16)
    q = WeightQuantizer(spec, w)
    q1 = q(w)
    assert q1.dtype == BF16
    scale, zero = q.qparams(w)
    q2 = fake_quant_values(weight_rows(q1, spec), scale, zero, spec).to(BF16).reshape(w.shape)
    assert torch.equal(q2, q1)


@pytest.mark.parametrize("outliers", [False, True], ids=["plain", "outliers"])
@pytest.mark.parametrize("spec", [s for s in PROPERTY_SPECS if s.format != "fp8"], ids=spec_id)
def test_code_range(spec, outliers):
    w = rand_weight((6, 21), "range", spec_id(spec), outliers)
    if outliers:
        w[2, 3], w[3, 10], w[5, 20] = 60.0, -90.0, 1e4
    q = _quantizer(spec, w)
    codes, scale, zero = q.quantize(w)
    lo, hi = (0, 15) if spec.format == "nf4" else (spec.qmin, spec.qmax)
    assert codes.min() >= lo and codes.max() <= hi
    if spec.format == "int" and spec.scale_method == "minmax" and spec.learnable == "none":
        # min/max scales use the whole grid: each row's extreme lands on the end of the grid
        rows = weight_rows(codes, spec)
        wr = weight_rows(w, spec)
        if spec.symmetric:
            # full signed range: a row whose absmax is positive tops out at qmax (from qmax + 1/2, clamped); one
            # whose absmax is negative reaches qmin + 1/2, which rounds to qmin or qmin + 1
            pos = wr.amax(-1) >= -wr.amin(-1)
            assert (rows.amax(-1)[pos] == spec.qmax).all()
            assert ((rows.amin(-1)[~pos] - spec.qmin) <= 1).all() and (rows.amin(-1) >= spec.qmin).all()
            assert pos.any() and (~pos).any() if spec.granularity != "tensor" else True
        else:
            # the grid spans [min(min, 0), max(max, 0)]: the row's max lands on 2^b-1 unless the row is all
            # negative, its min on 0 unless the row is all positive
            assert (rows.amax(-1)[wr.amax(-1) >= 0] == spec.qmax).all()
            assert (rows.amin(-1)[wr.amin(-1) <= 0] == 0).all()
            if spec.granularity != "tensor":
                assert (wr.amax(-1) < 0).any() and (wr.amin(-1) > 0).any()
    if spec.format == "nf4" and spec.learnable == "none":
        assert (weight_rows(codes, spec).amax(-1) == 15).any()


# ---------------------------------------------------------------------------------------------
# 7. bf16.


@pytest.mark.parametrize("spec", [
    TensorSpec(bits=4, granularity="channel"),
    TensorSpec(bits=8, granularity="channel"),
    TensorSpec(bits=8, symmetric=False, granularity="channel"),
    TensorSpec(bits=3, symmetric=False, granularity="group", group_size=7),
    TensorSpec(bits=4, granularity="tensor"),
    TensorSpec(bits=4, granularity="channel", scale_method="percentile", percentile=95.0),
    TensorSpec(bits=4, symmetric=False, granularity="channel", learnable="lsq"),
    TensorSpec(bits=4, symmetric=False, granularity="group", group_size=7, learnable="lwc"),
], ids=spec_id)
def test_bf16_weight(spec):
    w = rand_weight((6, 21), "bf16", spec_id(spec)).to(BF16)
    q = _quantizer(spec, w)
    out = q(w)
    assert out.dtype == BF16 and out.shape == w.shape
    qs, qz = q.qparams(w)
    assert qs.dtype == torch.float32
    assert torch.equal(qs.to(BF16).float(), qs)  # scales are what a bf16 export stores
    codes, scale, zero = q.quantize(w)
    assert torch.equal(scale.reshape(qs.shape), qs.detach())
    deq = (codes.float().reshape(-1, scale.shape[-1], codes.shape[-1] // scale.shape[-1])
           - (0 if zero is None else zero.unsqueeze(-1))) * scale.unsqueeze(-1)
    assert torch.equal(deq.reshape(w.shape).to(BF16), out)
    # and the bf16 result is the fp32 reference given the same (bf16) weights, rounded to bf16
    rows = weight_rows(w.to(F64), spec)
    s, z = scale.reshape(-1, 1).double(), None if zero is None else zero.reshape(-1, 1).double()
    ref_c = ref_codes(rows, s, z, spec.bits, spec.symmetric)
    tie = ref_near_tie(rows, s)
    same = (weight_rows(codes, spec).double() == ref_c) | tie
    assert same.all()


@pytest.mark.parametrize("spec", [TensorSpec(bits=8, granularity="token"), TensorSpec(bits=4, granularity="token"),
                                  TensorSpec(bits=8, symmetric=False, granularity="tensor")], ids=spec_id)
def test_bf16_act_close_to_fp32(spec):
    x = rand_act((2, 7, 32), "bf16-act", spec_id(spec))
    aq = ActQuantizer(spec)
    out32, out16 = aq(x), aq(x.to(BF16))
    assert out16.dtype == BF16 and out32.dtype == torch.float32
    # bf16 rounds x and the range by <= 2^-8 relative (so x/s by <= |x/s| * 2^-7) and the output by 2^-8:
    # one rounding step apart plus |x| * 2^-6 at most
    rows = ref_act_rows(x.to(F64), spec.granularity)
    s, _ = ref_minmax(rows, spec.bits, spec.symmetric)
    o32, o16 = ref_act_rows(out32, spec.granularity).double(), ref_act_rows(out16, spec.granularity).double()
    assert ((o16 - o32).abs() <= 1.01 * s + 2**-6 * rows.abs()).all()
    rel = torch.linalg.vector_norm(o16 - o32) / torch.linalg.vector_norm(o32)
    assert rel < (1e-2 if spec.bits == 8 else 0.1)


# ---------------------------------------------------------------------------------------------
# 9. All-zero rows.


@pytest.mark.parametrize("spec", [s for s in PROPERTY_SPECS if s.granularity != "group"], ids=spec_id)
def test_zero_rows_give_zeros(spec):
    w = rand_weight((6, 21), "zeros", spec_id(spec))
    w[2] = 0.0
    q = _quantizer(spec, w)
    wz = w.clone().requires_grad_(True)
    out = q(wz)
    assert torch.isfinite(out).all()
    if spec.granularity == "tensor":
        zero_w = torch.zeros_like(w).requires_grad_(True)
        out_z = WeightQuantizer(spec, zero_w.detach())(zero_w)
        assert torch.equal(out_z, torch.zeros_like(out_z))
        out_z.sum().backward()
        assert torch.isfinite(zero_w.grad).all()
    else:
        assert torch.equal(out[2], torch.zeros(21))
        if spec.learnable == "none":  # rows are independent: the other rows are quantized as before
            keep = [0, 1, 3, 4, 5]
            torch.testing.assert_close(out[keep], WeightQuantizer(spec, w[keep])(w[keep]), rtol=0, atol=0)
    out.sum().backward()
    assert torch.isfinite(wz.grad).all()
    for p in q.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_zero_activations_give_zeros(symmetric, granularity):
    spec = TensorSpec(bits=8, symmetric=symmetric, granularity=granularity)
    x = rand_act((2, 3, 8), "zero-act", symmetric, granularity)
    x[0, 1] = 0.0
    out = ActQuantizer(spec)(x)
    assert torch.isfinite(out).all() and torch.equal(out[0, 1], torch.zeros(8))
    z = ActQuantizer(spec)(torch.zeros(2, 3, 8))
    assert torch.equal(z, torch.zeros(2, 3, 8))

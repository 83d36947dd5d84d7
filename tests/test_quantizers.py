"""Numerics of qat.quantizers / qat.linear against an independent float64 reference.

The reference functions (tests/helpers/quant_ref.py) are written from the maths (see the design doc), not from
the module's helpers: symmetric int grids use scale = absmax / (2^(b-1) - 1) and codes in [-2^(b-1), 2^(b-1) - 1];
asymmetric grids use [min(min, 0), max(max, 0)] over 2^b - 1 steps with a rounded zero point; fp8 is
e4m3 with scale absmax / 448; nf4 picks the nearest of QLoRA's 16 NormalFloat levels times absmax.

fp32 (module) and float64 (reference) may round differently only where x/s is within ~1e-7 relative of
a .5 tie; such elements are masked (and must then differ by exactly one step); they are rare by
construction (random normal data), which every comparison also asserts.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.quant_ref import (
    BITS,
    E4M3_MAX,
    F64,
    NF4_REF,
    assert_int_matches_ref,
    rand_act,
    rand_weight,
    ref_act_rows,
    ref_codes,
    ref_dequant,
    ref_fp8,
    ref_grid,
    ref_minmax,
    ref_nf4_codes,
    ref_percentile,
    ref_range,
    ref_weight_rows,
    seeded_gen,
)

from qat.quantizers import (
    ActQuantizer,
    WeightQuantizer,
)
from qat.spec import TensorSpec

# ---------------------------------------------------------------------------------------------
# 1. int fake quant vs the float64 reference (min/max scales).

# (granularity, group_size, weight shape): odd group sizes dividing odd widths
WEIGHT_LAYOUTS = [
    ("tensor", None, (6, 21)),
    ("channel", None, (6, 21)),
    ("group", 3, (4, 21)),
    ("group", 7, (4, 21)),
    ("group", 5, (3, 35)),
    ("group", 7, (3, 35)),
    ("group", 16, (4, 64)),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric, grid", [(True, None), (True, "full"), (True, "qmax"), (False, None)],
                         ids=["sym", "sym-full", "sym-qmax", "asym"])
@pytest.mark.parametrize("granularity, group, shape", WEIGHT_LAYOUTS)
def test_weight_int_minmax_matches_float64(bits, symmetric, grid, granularity, group, shape):
    spec = TensorSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group,
                      sym_range=grid).check("weight")
    assert spec.sym_range == (grid or ("signed" if symmetric else "full"))  # the weights' default: signed
    w = rand_weight(shape, bits, symmetric, granularity, group)
    q = WeightQuantizer(spec, w)
    out = q(w)
    assert out.dtype == torch.float32 and out.shape == w.shape

    rows = ref_weight_rows(w.to(F64), granularity, group)
    s, z = ref_minmax(rows, bits, symmetric, spec.sym_range)
    codes, scale, zero = q.quantize(w)
    n_groups = 1 if granularity != "group" else shape[1] // group
    assert codes.shape == w.shape and codes.dtype == torch.int32
    assert scale.shape == ((1, 1) if granularity == "tensor" else (shape[0], n_groups))
    torch.testing.assert_close(scale.reshape(-1, 1).double(), s, rtol=1e-6, atol=0)
    if symmetric:
        assert zero is None
    else:
        t0 = -rows.amin(-1, keepdim=True).clamp(max=0) / s
        assert not ((t0 - t0.floor() - 0.5).abs() < 1e-4).any(), "zero point at a tie: pick another seed"
        assert torch.equal(zero.reshape(-1, 1).double(), z)
    assert_int_matches_ref(
        ref_weight_rows(out, granularity, group), rows, s, z, bits, symmetric,
        codes=ref_weight_rows(codes, granularity, group),
    )


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_act_int_minmax_matches_float64(bits, symmetric, granularity):
    spec = TensorSpec(bits=bits, symmetric=symmetric, granularity=granularity).check("activation")
    x = rand_act((2, 5, 24), bits, symmetric, granularity)
    out = ActQuantizer(spec)(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    rows = ref_act_rows(x.to(F64), granularity)
    s, z = ref_minmax(rows, bits, symmetric)
    assert_int_matches_ref(ref_act_rows(out, granularity), rows, s, z, bits, symmetric)


# ---------------------------------------------------------------------------------------------
# Clipping searches and learned clipping vs float64.


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("percentile", [80.0, 95.0])
@pytest.mark.parametrize("granularity, group, shape", [("channel", None, (6, 64)), ("group", 7, (4, 35))])
def test_weight_percentile_matches_float64(bits, symmetric, percentile, granularity, group, shape):
    spec = TensorSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group,
                      scale_method="percentile", percentile=percentile).check("weight")
    w = rand_weight(shape, "pct", bits, symmetric, percentile, granularity)
    q = WeightQuantizer(spec, w)
    rows = ref_weight_rows(w.to(F64), granularity, group)
    s, z = ref_percentile(rows, bits, symmetric, percentile, spec.sym_range)
    codes, scale, zero = q.quantize(w)
    torch.testing.assert_close(scale.reshape(-1, 1).double(), s, rtol=1e-6, atol=0)
    if z is not None:
        assert torch.equal(zero.reshape(-1, 1).double(), z)
    qmin, qmax = ref_grid(bits, symmetric)
    u = rows / s + (0 if z is None else z)
    clipped = (u < qmin) | (u > qmax) if z is not None else u.abs() > qmax
    n = rows.shape[-1]
    assert clipped.sum() >= (rows.shape[0] if math.ceil(percentile / 100 * n) < n else 0)
    assert_int_matches_ref(ref_weight_rows(q(w), granularity, group), rows, s, z, bits, symmetric,
                           codes=ref_weight_rows(codes, granularity, group))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity, group, shape", [("channel", None, (6, 64)), ("group", 16, (4, 64))])
def test_weight_mse_matches_float64(bits, symmetric, granularity, group, shape):
    spec = TensorSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group,
                      scale_method="mse").check("weight")
    w = rand_weight(shape, "mse", bits, symmetric, granularity)
    # heavy tails so that shrinking the range pays off in some rows
    w = w * (1 + 3 * (torch.rand(shape, generator=seeded_gen("mse-tail", bits, symmetric)) > 0.97))
    q = WeightQuantizer(spec, w)
    rows = ref_weight_rows(w.to(F64), granularity, group)
    lo, hi = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    cands, errs = [], []
    for i in range(21):  # shrink factors 1.0, 0.975, ..., 0.5; error sum |x - Q(x)|^2.4
        s_i, z_i = ref_range(lo * (1 - 0.5 * i / 20), hi * (1 - 0.5 * i / 20), bits, symmetric, spec.sym_range)
        deq = ref_dequant(ref_codes(rows, s_i, z_i, bits, symmetric), s_i, z_i)
        cands.append((s_i, z_i))
        errs.append((deq - rows).abs().pow(2.4).sum(-1, keepdim=True))
    errs_t = torch.cat(errs, -1)
    scale, zero = q.qparams(w)
    # the chosen scale is one of the grid's candidates ...
    rel = torch.cat([(scale.double() - c[0]).abs() / c[0] for c in cands], -1)
    chosen = rel.argmin(-1)
    assert (rel.min(-1).values < 1e-6).all()
    # ... with the least error (up to fp32 noise in near-equal errors), and the search did shrink some rows
    best = errs_t.min(-1).values
    got = errs_t.gather(-1, chosen[:, None])[:, 0]
    assert (got <= best * (1 + 1e-4) + 1e-12).all()
    assert (chosen > 0).any()
    s = scale.double()
    z = None if zero is None else zero.double()
    if z is not None:
        assert torch.equal(z, torch.cat([c[1] for c in cands], -1).gather(-1, chosen[:, None]))
    assert_int_matches_ref(ref_weight_rows(q(w), granularity, group), rows, s, z, bits, symmetric)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity, group", [("channel", None), ("group", 7)])
def test_weight_lwc_forward_matches_float64(symmetric, granularity, group):
    spec = TensorSpec(bits=4, symmetric=symmetric, granularity=granularity, group_size=group,
                      learnable="lwc").check("weight")
    w = rand_weight((6, 21), "lwc", symmetric, granularity)
    q = WeightQuantizer(spec, w)
    g = seeded_gen("lwc-logits", symmetric, granularity)
    with torch.no_grad():
        q.clip_hi.copy_(torch.rand(q.clip_hi.shape, generator=g) * 4 - 1)
        if not symmetric:
            q.clip_lo.copy_(torch.rand(q.clip_lo.shape, generator=g) * 4 - 1)
    rows = ref_weight_rows(w.to(F64), granularity, group)
    a_hi = torch.sigmoid(q.clip_hi.detach().double())
    if symmetric:  # the signed grid's scale is linear in the row's (min, max): the clip factor scales it
        assert spec.sym_range == "signed"
        s, z = ref_range(rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True), 4, True, "signed")
        s = a_hi * s
    else:
        a_lo = torch.sigmoid(q.clip_lo.detach().double())
        s, z = ref_range(a_lo * rows.amin(-1, keepdim=True), a_hi * rows.amax(-1, keepdim=True), 4, False)
    scale, zero = q.qparams(w)
    torch.testing.assert_close(scale.detach().double(), s, rtol=1e-6, atol=0)
    if z is not None:
        assert torch.equal(zero.detach().double(), z)
    codes = q.quantize(w)[0]
    assert_int_matches_ref(ref_weight_rows(q(w).detach(), granularity, group), rows, s, z, 4, symmetric,
                           codes=ref_weight_rows(codes, granularity, group))


# ---------------------------------------------------------------------------------------------
# 8. fp8 (e4m3) and nf4.


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_weight_matches_float64(granularity):
    spec = TensorSpec(bits=8, format="fp8", granularity=granularity).check("weight")
    w = rand_weight((6, 40), "fp8", granularity)
    w[3, :5] = w[3, :5] * 1e-3  # tiny values land on e4m3 subnormals
    q = WeightQuantizer(spec, w)
    out = q(w)
    rows = ref_weight_rows(w.to(F64), granularity, None)
    s = (rows.abs().amax(-1, keepdim=True) / E4M3_MAX)
    scale, zero = q.qparams(w)
    assert zero is None
    torch.testing.assert_close(scale.double(), s, rtol=1e-6, atol=0)
    ref = ref_fp8(rows, s)
    # near-ties of e4m3 rounding: the result moves under a 1e-6 relative nudge of x/s
    tie = (ref_fp8(rows * (1 + 1e-6), s) != ref_fp8(rows * (1 - 1e-6), s))
    assert tie.double().mean() < 0.01
    err = (ref_weight_rows(out, granularity, None).double() - ref).abs()
    assert (err[~tie] <= (1e-6 * (ref.abs() + s)).expand_as(err)[~tie]).all()
    # e4m3 keeps 3 mantissa bits: relative error of normals <= 2^-4; the row max is exact (448 * s)
    assert (ref_weight_rows(out, granularity, None).abs().amax(-1, keepdim=True).double() - 448 * s).abs().max() \
        <= 1e-6 * 448 * s.max()


def test_fp8_act_matches_float64():
    spec = TensorSpec(bits=8, format="fp8", granularity="token").check("activation")
    x = rand_act((3, 4, 32), "fp8-act")
    out = ActQuantizer(spec)(x)
    rows = ref_act_rows(x.to(F64), "token")
    s = rows.abs().amax(-1, keepdim=True) / E4M3_MAX
    ref = ref_fp8(rows, s)
    tie = ref_fp8(rows * (1 + 1e-6), s) != ref_fp8(rows * (1 - 1e-6), s)
    err = (ref_act_rows(out, "token").double() - ref).abs()
    assert (err[~tie] <= (1e-6 * (ref.abs() + s)).expand_as(err)[~tie]).all()


@pytest.mark.parametrize("granularity, group", [("group", 7), ("channel", None), ("group", 16)])
def test_nf4_matches_float64(granularity, group):
    spec = TensorSpec(bits=4, format="nf4", granularity=granularity, group_size=group).check("weight")
    w = rand_weight((4, 112), "nf4", granularity, group)
    q = WeightQuantizer(spec, w)
    codes, scale, zero = q.quantize(w)
    assert zero is None
    rows = ref_weight_rows(w.to(F64), granularity, group)
    s = rows.abs().amax(-1, keepdim=True)  # nf4 levels span [-1, 1]
    torch.testing.assert_close(scale.reshape(-1, 1).double(), s, rtol=1e-6, atol=0)
    ref_c = ref_nf4_codes(rows, s)
    mids = (NF4_REF[1:] + NF4_REF[:-1]) / 2
    tie = ((rows / s).unsqueeze(-1) - mids).abs().amin(-1) < 1e-6
    got = ref_weight_rows(codes, granularity, group)
    assert torch.equal(got[~tie].long(), ref_c[~tie])
    out = ref_weight_rows(q(w), granularity, group).double()
    ref = NF4_REF[ref_c] * s
    assert ((out - ref).abs()[~tie] <= (1e-6 * s).expand_as(out)[~tie]).all()
    assert torch.equal(q(w).reshape(-1).double().abs().amax(), w.double().abs().amax())  # +-1 level at absmax

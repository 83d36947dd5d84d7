"""Numerics of qat.quantizers / qat.linear against an independent float64 reference.

The reference functions below are written from the maths (see the design doc), not from the module's
helpers: symmetric int grids use scale = absmax / (2^(b-1) - 1) and codes in [-2^(b-1), 2^(b-1) - 1];
asymmetric grids use [min(min, 0), max(max, 0)] over 2^b - 1 steps with a rounded zero point; fp8 is
e4m3 with scale absmax / 448; nf4 picks the nearest of QLoRA's 16 NormalFloat levels times absmax.

fp32 (module) and float64 (reference) may round differently only where x/s is within ~1e-7 relative of
a .5 tie; such elements are masked (and must then differ by exactly one step); they are rare by
construction (random normal data), which every comparison also asserts.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.apply import calibrate
from qat.linear import QuantLinear
from qat.quantizers import (
    ActQuantizer,
    WeightQuantizer,
    act_rows,
    dequantize_codes,
    fake_quant,
    fake_quant_values,
    quantize_codes,
    weight_rows,
)
from qat.spec import TensorSpec

F64 = torch.float64
BF16 = torch.bfloat16
STE_RTOL = 2.5e-7  # clipping STE: autograd computes (g * s) / s in fp32, i.e. g up to ~2 ulp
TIE_REL = 1e-5  # |frac(x/s) - 0.5| below this (relative to |x/s|) counts as a tie fp32 may break differently

# QLoRA's NormalFloat-4 levels (bitsandbytes), written out independently of qat.quantizers.NF4_LEVELS.
NF4_REF = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=F64)
E4M3_MAX = 448.0


# ---------------------------------------------------------------------------------------------
# Deterministic inputs: a fresh generator per case, seeded from the case's parameters.


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _weight(shape, *key) -> torch.Tensor:
    """Random normal rows of different magnitudes and offsets; row 0 all positive, row 1 all negative."""
    g = _gen("weight", shape, *key)
    w = torch.randn(shape, generator=g) * torch.exp(0.5 * torch.randn(shape[0], 1, generator=g))
    w = w + 0.3 * torch.randn(shape[0], 1, generator=g)
    w[0] = w[0].abs() + 0.05
    w[1] = -w[1].abs() - 0.05
    return w


def _act(shape, *key) -> torch.Tensor:
    g = _gen("act", shape, *key)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g))
    return x + 0.5 * torch.randn(*shape[:-1], 1, generator=g)


# ---------------------------------------------------------------------------------------------
# float64 reference.


def ref_grid(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def ref_weight_rows(w: torch.Tensor, granularity: str, group: int | None) -> torch.Tensor:
    out, inp = w.shape
    if granularity == "tensor":
        return w.reshape(1, out * inp)
    if granularity == "channel":
        return w.reshape(out, inp)
    assert inp % group == 0
    return w.reshape(out, inp // group, group).reshape(out * (inp // group), group)


def ref_act_rows(x: torch.Tensor, granularity: str) -> torch.Tensor:
    return x.reshape(1, -1) if granularity == "tensor" else x.reshape(-1, x.shape[-1])


def ref_range(lo, hi, bits, symmetric):
    """float64 (scale, zero) mapping [lo, hi] (per row) onto the integer grid."""
    qmin, qmax = ref_grid(bits, symmetric)
    if symmetric:
        return (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(1e-8), None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    s = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    return s, torch.round(-lo / s).clamp(qmin, qmax)


def ref_minmax(rows, bits, symmetric):
    return ref_range(rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True), bits, symmetric)


def ref_percentile(rows, bits, symmetric, p):
    """Nearest-rank percentile per row: the ceil(p/100 * n)-th smallest (of |x| when symmetric)."""
    n = rows.shape[-1]
    k = min(n, max(1, math.ceil(p / 100.0 * n)))
    if symmetric:
        hi = rows.abs().sort(-1).values[:, k - 1 : k]
        return ref_range(-hi, hi, bits, symmetric)
    srt = rows.sort(-1).values
    return ref_range(srt[:, n - k : n - k + 1], srt[:, k - 1 : k], bits, symmetric)


def ref_codes(rows, s, z, bits, symmetric):
    qmin, qmax = ref_grid(bits, symmetric)
    q = torch.round(rows / s)  # round half to even
    if z is not None:
        q = q + z
    return q.clamp(qmin, qmax)


def ref_dequant(codes, s, z):
    return (codes - z) * s if z is not None else codes * s


def ref_near_tie(rows, s):
    t = rows / s
    return ((t - t.floor()) - 0.5).abs() < TIE_REL * t.abs().clamp_min(1.0)


def ref_fp8(rows, s):
    y = (rows / s).clamp(-E4M3_MAX, E4M3_MAX)
    return y.to(torch.float8_e4m3fn).to(F64) * s


def ref_nf4_codes(rows, s):
    return (rows / s).unsqueeze(-1).sub(NF4_REF).abs().argmin(-1)


def assert_int_matches_ref(out_rows, rows, s, z, bits, symmetric, codes=None):
    """fp32 fake-quant rows (and optionally int codes) equal the float64 reference given (s, z).

    Away from ties: |out - ref| <= 1e-6 * (|ref| + s) (a few fp32 ulps) and identical codes.
    At near-ties: the code may differ by one step (and the value by one scale).
    """
    ref_c = ref_codes(rows, s, z, bits, symmetric)
    deq = ref_dequant(ref_c, s, z)
    tie = ref_near_tie(rows, s)
    assert tie.double().mean() < 0.01, "too many near-ties: the comparison would be hollow"
    err = (out_rows.double() - deq).abs()
    tol = 1e-6 * (deq.abs() + s)
    bad = (err > tol) & ~(tie & (err <= s * (1 + 1e-5)))
    assert not bad.any(), f"{int(bad.sum())} values off the float64 reference; max err/s {float((err / s).max())}"
    if codes is not None:
        diff = codes.double() - ref_c
        assert torch.equal(diff[~tie], torch.zeros_like(diff[~tie])), "codes differ from the reference"
        assert diff.abs().max() <= 1


def _spec_id(spec: TensorSpec) -> str:
    parts = [spec.format + str(spec.bits), "sym" if spec.symmetric else "asym", spec.granularity]
    if spec.group_size:
        parts.append(f"g{spec.group_size}")
    if spec.scale_method != "minmax":
        parts.append(spec.scale_method)
    if spec.learnable != "none":
        parts.append(spec.learnable)
    return "-".join(parts)


# ---------------------------------------------------------------------------------------------
# 1. int fake quant vs the float64 reference (min/max scales).

BITS = (2, 3, 4, 8)
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
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity, group, shape", WEIGHT_LAYOUTS)
def test_weight_int_minmax_matches_float64(bits, symmetric, granularity, group, shape):
    spec = TensorSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group).check("weight")
    w = _weight(shape, bits, symmetric, granularity, group)
    q = WeightQuantizer(spec, w)
    out = q(w)
    assert out.dtype == torch.float32 and out.shape == w.shape

    rows = ref_weight_rows(w.to(F64), granularity, group)
    s, z = ref_minmax(rows, bits, symmetric)
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
    x = _act((2, 5, 24), bits, symmetric, granularity)
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
    w = _weight(shape, "pct", bits, symmetric, percentile, granularity)
    q = WeightQuantizer(spec, w)
    rows = ref_weight_rows(w.to(F64), granularity, group)
    s, z = ref_percentile(rows, bits, symmetric, percentile)
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
    w = _weight(shape, "mse", bits, symmetric, granularity)
    # heavy tails so that shrinking the range pays off in some rows
    w = w * (1 + 3 * (torch.rand(shape, generator=_gen("mse-tail", bits, symmetric)) > 0.97))
    q = WeightQuantizer(spec, w)
    rows = ref_weight_rows(w.to(F64), granularity, group)
    lo, hi = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    cands, errs = [], []
    for i in range(21):  # shrink factors 1.0, 0.975, ..., 0.5; error sum |x - Q(x)|^2.4
        s_i, z_i = ref_range(lo * (1 - 0.5 * i / 20), hi * (1 - 0.5 * i / 20), bits, symmetric)
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
    w = _weight((6, 21), "lwc", symmetric, granularity)
    q = WeightQuantizer(spec, w)
    g = _gen("lwc-logits", symmetric, granularity)
    with torch.no_grad():
        q.clip_hi.copy_(torch.rand(q.clip_hi.shape, generator=g) * 4 - 1)
        if not symmetric:
            q.clip_lo.copy_(torch.rand(q.clip_lo.shape, generator=g) * 4 - 1)
    rows = ref_weight_rows(w.to(F64), granularity, group)
    a_hi = torch.sigmoid(q.clip_hi.detach().double())
    if symmetric:
        hi = a_hi * rows.abs().amax(-1, keepdim=True)
        s, z = ref_range(-hi, hi, 4, True)
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
    g = _gen("params", _spec_id(spec))
    with torch.no_grad():
        if spec.learnable == "lsq":
            q.scale.mul_(0.6 + 0.3 * torch.rand(q.scale.shape, generator=g))
        elif spec.learnable == "lwc":
            q.clip_hi.copy_(torch.rand(q.clip_hi.shape, generator=g) * 3 - 1)
            if q.clip_lo is not None:
                q.clip_lo.copy_(torch.rand(q.clip_lo.shape, generator=g) * 3 - 1)
    return q


@pytest.mark.parametrize("spec", PROPERTY_SPECS, ids=_spec_id)
def test_idempotent_and_dequant_of_codes(spec):
    w = _weight((6, 21), "idem", _spec_id(spec))
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
                         ids=_spec_id)
def test_idempotent_bf16(spec):
    """bf16 weights: re-quantizing the bf16 output with the same scales gives the same bf16 values.

    All-positive rows put asymmetric codes up to 2^b - 1, where (code - zero) * scale has more
    significant bits than bf16 holds.
    """
    w = (_weight((64, 21), "idem-bf16", _spec_id(spec)).abs() * 3 + 0.01).to(BF16)
    q = WeightQuantizer(spec, w)
    q1 = q(w)
    assert q1.dtype == BF16
    scale, zero = q.qparams(w)
    q2 = fake_quant_values(weight_rows(q1, spec), scale, zero, spec).to(BF16).reshape(w.shape)
    assert torch.equal(q2, q1)


@pytest.mark.parametrize("outliers", [False, True], ids=["plain", "outliers"])
@pytest.mark.parametrize("spec", [s for s in PROPERTY_SPECS if s.format != "fp8"], ids=_spec_id)
def test_code_range(spec, outliers):
    w = _weight((6, 21), "range", _spec_id(spec), outliers)
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
            assert torch.equal(rows.abs().amax(-1), torch.full((rows.shape[0],), spec.qmax, dtype=torch.int32))
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
# 4. Straight-through gradients.

MINMAX_WEIGHT_SPECS = [
    TensorSpec(bits=b, symmetric=sym, granularity=gran, group_size=grp)
    for b in (2, 4, 8) for sym in (True, False) for gran, grp in (("tensor", None), ("channel", None), ("group", 7))
] + [TensorSpec(bits=8, format="fp8"), TensorSpec(bits=4, format="nf4", granularity="group", group_size=7)]


@pytest.mark.parametrize("spec", MINMAX_WEIGHT_SPECS, ids=_spec_id)
def test_ste_identity_minmax_weight(spec):
    w = _weight((6, 21), "ste", _spec_id(spec)).requires_grad_(True)
    up = torch.randn(w.shape, generator=_gen("ste-up", _spec_id(spec)))
    WeightQuantizer(spec, w)(w).backward(up)
    assert torch.equal(w.grad, up)


@pytest.mark.parametrize("spec", [
    TensorSpec(bits=b, symmetric=sym, granularity=gran) for b in (4, 8) for sym in (True, False)
    for gran in ("token", "tensor")
] + [TensorSpec(bits=8, format="fp8", granularity="token")], ids=_spec_id)
def test_ste_identity_minmax_act(spec):
    x = _act((2, 3, 16), "ste", _spec_id(spec)).requires_grad_(True)
    up = torch.randn(x.shape, generator=_gen("ste-up-act", _spec_id(spec)))
    ActQuantizer(spec)(x).backward(up)
    assert torch.equal(x.grad, up)


def _percentile_case(symmetric):
    spec = TensorSpec(bits=4, symmetric=symmetric, granularity="channel", scale_method="percentile",
                      percentile=90.0).check("weight")
    w = _weight((16, 64), "pct-ste", symmetric).requires_grad_(True)
    up = torch.randn(w.shape, generator=_gen("pct-ste-up", symmetric))
    q = WeightQuantizer(spec, w)
    q(w).backward(up)
    scale, zero = q.qparams(w.detach())
    u = w.detach().double() / scale.double() + (0 if zero is None else zero.double())  # value on the grid
    boundary = ((u - spec.qmin).abs() < 1e-4) | ((u - spec.qmax).abs() < 1e-4)
    inside = (u >= spec.qmin) & (u <= spec.qmax)
    # the half-step just outside each end of the grid: round() brings these back onto the grid
    band = ((u > spec.qmax) & (u < spec.qmax + 0.5)) | ((u < spec.qmin) & (u > spec.qmin - 0.5))
    return spec, w, up, inside, boundary, band


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_ste_clipping_away_from_grid_ends(symmetric):
    """Percentile scales clip: the gradient is upstream inside the grid and 0 well outside it."""
    spec, w, up, inside, boundary, band = _percentile_case(symmetric)
    far = ~inside & ~band & ~boundary
    assert inside.sum() > 0.8 * w.numel() and far.sum() > 0.05 * w.numel()
    assert band.sum() > 0  # premise of test_ste_clipping_contract
    # autograd computes (g * s) / s in fp32: upstream up to one rounding step, not bit-exact
    torch.testing.assert_close(w.grad[inside & ~boundary], up[inside & ~boundary], rtol=STE_RTOL, atol=0)
    assert torch.equal(w.grad[far], torch.zeros_like(w.grad[far]))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_ste_clipping_contract(symmetric):
    """Gradient = upstream where qmin <= x/s (+z) <= qmax, exactly 0 where it exceeds the grid."""
    spec, w, up, inside, boundary, band = _percentile_case(symmetric)
    expected = torch.where(inside, up, torch.zeros_like(up))
    torch.testing.assert_close(w.grad[~boundary], expected[~boundary], rtol=STE_RTOL, atol=0)


# ---------------------------------------------------------------------------------------------
# 5. LSQ step-size gradient.


def _lsq_case(symmetric: bool, band: bool):
    """A 4-bit per-channel LSQ quantizer with shrunk scales (so the row ends clip) and a weight whose
    values avoid the kinks of the grid and rounding ties; `band` puts two values per row in the
    half-step just outside the grid ends (x/s + z = qmax + 0.25 and qmin - 0.25)."""
    spec = TensorSpec(bits=4, symmetric=symmetric, granularity="channel", learnable="lsq").check("weight")
    w0 = _weight((6, 32), "lsq", symmetric)
    q = WeightQuantizer(spec, w0)
    with torch.no_grad():
        q.scale.mul_(torch.linspace(0.6, 0.9, 6)[:, None])
    s = q.scale.detach().double()
    z = torch.zeros_like(s) if symmetric else q.zero.detach().double().round().clamp(spec.qmin, spec.qmax)
    qmin, qmax = spec.qmin, spec.qmax
    u = w0.double() / s + z
    u = torch.where((u > qmax - 1e-3) & (u < qmax + 0.5 + 1e-3), u + 1.0, u)
    u = torch.where((u < qmin + 1e-3) & (u > qmin - 0.5 - 1e-3), u - 1.0, u)
    u = torch.where(((u - u.floor()) - 0.5).abs() < 1e-3, u + 0.1, u)
    if band:
        u[:, 0], u[:, 1] = qmax + 0.25, qmin - 0.25
    w = ((u - z) * s).float()
    g = torch.randn(w.shape, generator=_gen("lsq-g", symmetric), dtype=F64)
    return spec, q, w, g, s, z


def _lsq_formula(w, g, s, z, qmin, qmax):
    """Per row: sum of g * (round(w/s) - w/s) inside the grid, g * (qmin - z) / g * (qmax - z) outside."""
    t = w.double() / s
    u = t + z
    d = torch.where(u < qmin, qmin - z, torch.where(u > qmax, qmax - z, torch.round(t) - t))
    return (g * d).sum(-1, keepdim=True), (g * d).abs().sum(-1, keepdim=True)


def _lsq_module_grad(q, w, g):
    q.zero_grad()
    w = w.clone().requires_grad_(True)
    (g.float() * q(w)).sum().backward()
    return q.scale.grad.double(), w.grad


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_lsq_scale_grad_formula_and_finite_difference(symmetric):
    spec, q, w, g, s, z = _lsq_case(symmetric, band=False)
    qmin, qmax = spec.qmin, spec.qmax
    n = w.shape[1]
    gscale = 1.0 / math.sqrt(n * qmax)
    ref, mag = _lsq_formula(w, g, s, z, qmin, qmax)
    u = w.double() / s + z
    outside = (u < qmin) | (u > qmax)
    assert outside.any(-1).all() and (~outside).sum() > 0.7 * w.numel()  # every row clips some values

    # STE surrogate with the rounding offset frozen at s0: s * (clamp(w/s + z, qmin, qmax) + c - z)
    w64 = w.double()
    c = torch.round(u.clamp(qmin, qmax)) - u.clamp(qmin, qmax)
    surrogate = lambda sv: (g * sv * ((w64 / sv + z).clamp(qmin, qmax) + c - z)).sum(-1, keepdim=True)
    h = 1e-6
    fd = (surrogate(s + h) - surrogate(s - h)) / (2 * h)
    torch.testing.assert_close(fd, ref, rtol=1e-6, atol=1e-9)

    grad, wgrad = _lsq_module_grad(q, w, g)
    assert grad.shape == s.shape
    # module (fp32) / grad scale vs float64 finite difference: 1e-6 relative to the row's sum of |terms|
    assert ((grad / gscale - fd).abs() <= 1e-6 * mag).all(), (grad / gscale - fd).abs().max()
    # straight-through to the weight: upstream inside the grid, 0 outside
    torch.testing.assert_close(wgrad, torch.where(outside, 0.0, g).float(), rtol=STE_RTOL, atol=0)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_lsq_scale_grad_half_step_outside_grid(symmetric):
    spec, q, w, g, s, z = _lsq_case(symmetric, band=True)
    ref, mag = _lsq_formula(w, g, s, z, spec.qmin, spec.qmax)
    grad, wgrad = _lsq_module_grad(q, w, g)
    gscale = 1.0 / math.sqrt(w.shape[1] * spec.qmax)
    assert ((grad / gscale - ref).abs() <= 1e-6 * mag).all()
    assert torch.equal(wgrad[:, :2], torch.zeros_like(wgrad[:, :2]))


def test_lsq_asym_zero_point_grad():
    """The learned zero point gets -s * g (times the grad scale) from each clipped value, 0 from the others."""
    spec, q, w, g, s, z = _lsq_case(False, band=False)
    _lsq_module_grad(q, w, g)
    u = w.double() / s + z
    outside = (u < spec.qmin) | (u > spec.qmax)
    ref = (torch.where(outside, -g * s, 0.0)).sum(-1, keepdim=True) / math.sqrt(w.shape[1] * spec.qmax)
    torch.testing.assert_close(q.zero.grad.double(), ref, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 6. LWC.


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_lwc_gradients_reach_clip_logits(symmetric):
    spec = TensorSpec(bits=4, symmetric=symmetric, granularity="channel", learnable="lwc").check("weight")
    w = _weight((6, 21), "lwc-grad", symmetric)
    q = WeightQuantizer(spec, w)
    up = torch.randn(w.shape, generator=_gen("lwc-up", symmetric))
    (up * q(w)).sum().backward()
    if symmetric:
        assert q.clip_lo is None
        grads = {"hi": (q.clip_hi.grad, [])}
    else:
        # row 0 is all positive (lo pinned at 0), row 1 all negative (hi pinned at 0): no gradient there
        grads = {"hi": (q.clip_hi.grad, [1]), "lo": (q.clip_lo.grad, [0])}
    for grad, pinned in grads.values():
        assert grad is not None and grad.shape == (6, 1) and torch.isfinite(grad).all()
        free = [r for r in range(6) if r not in pinned]
        assert (grad[free] != 0).all()
        assert torch.equal(grad[pinned], torch.zeros_like(grad[pinned]))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("granularity, group", [("channel", None), ("group", 7), ("tensor", None)])
def test_lwc_saturated_equals_minmax(symmetric, granularity, group):
    kw = dict(bits=4, symmetric=symmetric, granularity=granularity, group_size=group)
    w = _weight((6, 21), "lwc-sat", symmetric, granularity)
    lwc = WeightQuantizer(TensorSpec(**kw, learnable="lwc"), w)
    with torch.no_grad():
        lwc.clip_hi.fill_(40.0)  # sigmoid(40) == 1 in fp32
        if lwc.clip_lo is not None:
            lwc.clip_lo.fill_(40.0)
    ref = WeightQuantizer(TensorSpec(**kw), w)(w)
    assert torch.equal(lwc(w), ref)


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
], ids=_spec_id)
def test_bf16_weight(spec):
    w = _weight((6, 21), "bf16", _spec_id(spec)).to(BF16)
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
                                  TensorSpec(bits=8, symmetric=False, granularity="tensor")], ids=_spec_id)
def test_bf16_act_close_to_fp32(spec):
    x = _act((2, 7, 32), "bf16-act", _spec_id(spec))
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
# 8. fp8 (e4m3) and nf4.


@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_fp8_weight_matches_float64(granularity):
    spec = TensorSpec(bits=8, format="fp8", granularity=granularity).check("weight")
    w = _weight((6, 40), "fp8", granularity)
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
    x = _act((3, 4, 32), "fp8-act")
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
    w = _weight((4, 112), "nf4", granularity, group)
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


# ---------------------------------------------------------------------------------------------
# 9. All-zero rows.


@pytest.mark.parametrize("spec", [s for s in PROPERTY_SPECS if s.granularity != "group"], ids=_spec_id)
def test_zero_rows_give_zeros(spec):
    w = _weight((6, 21), "zeros", _spec_id(spec))
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
    x = _act((2, 3, 8), "zero-act", symmetric, granularity)
    x[0, 1] = 0.0
    out = ActQuantizer(spec)(x)
    assert torch.isfinite(out).all() and torch.equal(out[0, 1], torch.zeros(8))
    z = ActQuantizer(spec)(torch.zeros(2, 3, 8))
    assert torch.equal(z, torch.zeros(2, 3, 8))


# ---------------------------------------------------------------------------------------------
# 10. QuantLinear.

W_SPEC = TensorSpec(bits=4, granularity="group", group_size=7)
A_SPEC = TensorSpec(bits=8, granularity="token")


def test_quantlinear_forward_matches_quantizer_functions():
    torch.manual_seed(0)
    lin = nn.Linear(21, 6)
    ql = QuantLinear.from_linear(lin, W_SPEC, A_SPEC)
    x = _act((2, 5, 21), "ql")
    y = ql(x)
    qx = fake_quant(act_rows(x, A_SPEC), A_SPEC).reshape(x.shape)
    qw = fake_quant(weight_rows(lin.weight, W_SPEC), W_SPEC, torch.float32).reshape(lin.weight.shape)
    assert torch.equal(y, F.linear(qx, qw, lin.bias))
    assert not torch.allclose(y, lin(x), rtol=1e-3, atol=1e-3)  # the quantization is actually applied
    # against the float64 reference of the same quantizers: close up to fp32 matmul noise and rare ties
    wr = ref_weight_rows(lin.weight.detach().double(), "group", 7)
    sw, _ = ref_minmax(wr, 4, True)
    w_ref = ref_dequant(ref_codes(wr, sw, None, 4, True), sw, None).reshape(6, 21)
    xr = ref_act_rows(x.double(), "token")
    sx, _ = ref_minmax(xr, 8, True)
    x_ref = ref_dequant(ref_codes(xr, sx, None, 8, True), sx, None).reshape(x.shape)
    torch.testing.assert_close(y.double(), F.linear(x_ref, w_ref, lin.bias.double()), rtol=1e-5, atol=1e-5)


def test_quantlinear_autocast_bf16():
    torch.manual_seed(1)
    lin = nn.Linear(21, 6)
    ql = QuantLinear.from_linear(lin, W_SPEC, A_SPEC)
    x = _act((2, 5, 21), "ql-ac").requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        y = ql(x)
        qx = fake_quant(act_rows(x.to(BF16), A_SPEC), A_SPEC).reshape(x.shape)
        w16 = lin.weight.to(BF16)
        qw = fake_quant(weight_rows(w16, W_SPEC), W_SPEC, BF16).reshape(w16.shape)
        y_ref = F.linear(qx, qw, lin.bias)
    assert y.dtype == BF16 and torch.isfinite(y).all()
    assert torch.equal(y, y_ref)
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(lin.weight.grad).all()


def test_quantlinear_from_to_linear_share_parameters():
    torch.manual_seed(2)
    lin = nn.Linear(21, 6)
    ql = QuantLinear.from_linear(lin, W_SPEC, A_SPEC)
    assert ql.weight is lin.weight and ql.bias is lin.bias
    assert isinstance(ql, nn.Linear) and (ql.in_features, ql.out_features) == (21, 6)
    back = ql.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight and back.bias is lin.bias
    baked = ql.to_linear(fake_quantized=True)
    assert baked.weight is not lin.weight
    qw = WeightQuantizer(W_SPEC, lin.weight)(lin.weight)
    assert torch.equal(baked.weight, qw) and not torch.equal(baked.weight, lin.weight)
    assert torch.equal(baked.bias, lin.bias) and baked.bias is not lin.bias
    # with the weight quantized already, a weight-only QuantLinear over the baked linear changes nothing
    x = _act((3, 21), "ql-baked")
    assert torch.equal(QuantLinear.from_linear(baked, W_SPEC)(x), F.linear(x, qw, lin.bias))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_quantlinear_lsq_state_dict_round_trip(symmetric):
    spec = TensorSpec(bits=4, symmetric=symmetric, granularity="channel", learnable="lsq")
    torch.manual_seed(3)
    ql = QuantLinear(21, 6, weight_spec=spec, act_spec=A_SPEC)
    with torch.no_grad():
        ql.weight_quantizer.scale.mul_(torch.linspace(0.7, 1.1, 6)[:, None])  # no longer the init value
    sd = ql.state_dict()
    assert "weight_quantizer.scale" in sd and sd["weight_quantizer.scale"].shape == (6, 1)
    assert ("weight_quantizer.zero" in sd) == (not symmetric)
    torch.manual_seed(4)
    fresh = QuantLinear(21, 6, weight_spec=spec, act_spec=A_SPEC)
    x = _act((4, 21), "ql-sd")
    assert not torch.equal(fresh(x), ql(x))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), ql(x))


# ---------------------------------------------------------------------------------------------
# 11. Static (calibrated) activation scales.


def test_static_activation_scale_calibration():
    spec = TensorSpec(bits=8, granularity="tensor", dynamic=False).check("activation")
    torch.manual_seed(5)
    first = nn.Linear(8, 16)
    ql = QuantLinear(16, 4, weight_spec=TensorSpec(bits=4), act_spec=spec)
    model = nn.Sequential(first, nn.GELU(), ql)
    x0 = _act((3, 8), "calib-0")
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(x0)
    batches = [x0, 3.0 * _act((5, 8), "calib-1"), 0.5 * _act((2, 8), "calib-2")]
    with torch.no_grad():
        hidden = [F.gelu(first(b)) for b in batches]
    with calibrate(model):
        for b, h in zip(batches, hidden):  # observing only: the input passes through unquantized
            assert torch.equal(model(b), ql.to_linear(fake_quantized=True)(h))
    absmax = max(float(h.abs().amax()) for h in hidden)
    assert absmax != float(hidden[0].abs().amax()) and absmax != float(hidden[-1].abs().amax())
    scale = ql.input_quantizer.scale
    assert scale.shape == (1,)
    torch.testing.assert_close(scale.double(), torch.tensor([absmax / 127.0], dtype=F64), rtol=1e-6, atol=0)
    # after calibration: a fixed per-tensor grid, values beyond the calibrated range clip to its ends
    h = torch.cat([2.0 * hidden[1], -2.0 * hidden[1]])
    out = ql.input_quantizer(h)
    s = scale.double()
    ref = torch.round(h.double() / s).clamp(-128, 127) * s
    tie = ref_near_tie(h.double(), s)
    assert ((out.double() - ref).abs()[~tie] <= 1e-6 * (ref.abs()[~tie] + s)).all()
    assert out.max() == 127 * scale and out.min() == -128 * scale

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

from qat.quantizers import (
    ActQuantizer,
    WeightQuantizer,
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

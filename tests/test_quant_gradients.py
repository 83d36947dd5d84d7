"""Straight-through gradients of the fake quantizers: identity, clipping masks, LSQ and LWC parameters."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.quant_ref import F64, STE_RTOL, rand_act, rand_weight, seeded_gen, spec_id

from qat.quantizers import ActQuantizer, WeightQuantizer
from qat.spec import TensorSpec

# 4. Straight-through gradients.

MINMAX_WEIGHT_SPECS = [
    TensorSpec(bits=b, symmetric=sym, granularity=gran, group_size=grp)
    for b in (2, 4, 8) for sym in (True, False) for gran, grp in (("tensor", None), ("channel", None), ("group", 7))
] + [TensorSpec(bits=8, format="fp8"), TensorSpec(bits=4, format="nf4", granularity="group", group_size=7)]


@pytest.mark.parametrize("spec", MINMAX_WEIGHT_SPECS, ids=spec_id)
def test_ste_identity_minmax_weight(spec):
    w = rand_weight((6, 21), "ste", spec_id(spec)).requires_grad_(True)
    up = torch.randn(w.shape, generator=seeded_gen("ste-up", spec_id(spec)))
    WeightQuantizer(spec, w)(w).backward(up)
    assert torch.equal(w.grad, up)


@pytest.mark.parametrize("spec", [
    TensorSpec(bits=b, symmetric=sym, granularity=gran) for b in (4, 8) for sym in (True, False)
    for gran in ("token", "tensor")
] + [TensorSpec(bits=8, format="fp8", granularity="token")], ids=spec_id)
def test_ste_identity_minmax_act(spec):
    x = rand_act((2, 3, 16), "ste", spec_id(spec)).requires_grad_(True)
    up = torch.randn(x.shape, generator=seeded_gen("ste-up-act", spec_id(spec)))
    ActQuantizer(spec)(x).backward(up)
    assert torch.equal(x.grad, up)


def _percentile_case(symmetric):
    spec = TensorSpec(bits=4, symmetric=symmetric, granularity="channel", scale_method="percentile",
                      percentile=90.0).check("weight")
    w = rand_weight((16, 64), "pct-ste", symmetric).requires_grad_(True)
    up = torch.randn(w.shape, generator=seeded_gen("pct-ste-up", symmetric))
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
    w0 = rand_weight((6, 32), "lsq", symmetric)
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
    g = torch.randn(w.shape, generator=seeded_gen("lsq-g", symmetric), dtype=F64)
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
    w = rand_weight((6, 21), "lwc-grad", symmetric)
    q = WeightQuantizer(spec, w)
    up = torch.randn(w.shape, generator=seeded_gen("lwc-up", symmetric))
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
    w = rand_weight((6, 21), "lwc-sat", symmetric, granularity)
    lwc = WeightQuantizer(TensorSpec(**kw, learnable="lwc"), w)
    with torch.no_grad():
        lwc.clip_hi.fill_(40.0)  # sigmoid(40) == 1 in fp32
        if lwc.clip_lo is not None:
            lwc.clip_lo.fill_(40.0)
    ref = WeightQuantizer(TensorSpec(**kw), w)(w)
    assert torch.equal(lwc(w), ref)



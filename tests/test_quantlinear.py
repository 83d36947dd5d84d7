"""QuantLinear (forward, autocast, shared parameters, state_dict) and static activation calibration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.quant_ref import (
    BF16,
    F64,
    rand_act,
    ref_act_rows,
    ref_codes_taking_ties,
    ref_dequant,
    ref_minmax,
    ref_near_tie,
    ref_weight_rows,
)
from torch import nn

from qat.apply import calibrate
from qat.linear import QuantLinear
from qat.quantizers import WeightQuantizer, act_rows, fake_quant, weight_rows
from qat.spec import TensorSpec

# ---------------------------------------------------------------------------------------------
# 10. QuantLinear.

W_SPEC = TensorSpec(bits=4, granularity="group", group_size=7)
A_SPEC = TensorSpec(bits=8, granularity="token")


def test_quantlinear_forward_matches_quantizer_functions():
    torch.manual_seed(0)
    lin = nn.Linear(21, 6)
    ql = QuantLinear.from_linear(lin, W_SPEC, A_SPEC)
    x = rand_act((2, 5, 21), "ql")
    y = ql(x)
    qx = fake_quant(act_rows(x, A_SPEC), A_SPEC).reshape(x.shape)
    qw = fake_quant(weight_rows(lin.weight, W_SPEC), W_SPEC, torch.float32).reshape(lin.weight.shape)
    assert torch.equal(y, F.linear(qx, qw, lin.bias))
    assert not torch.allclose(y, lin(x), rtol=1e-3, atol=1e-3)  # the quantization is actually applied
    # against the float64 reference of the same quantizers: close up to fp32 matmul noise and rare ties (a row's
    # negative absmax sits at qmin + 1/2 on the full signed range: there the fp32 path's code is taken)
    wr = ref_weight_rows(lin.weight.detach().double(), "group", 7)
    sw, _ = ref_minmax(wr, 4, True)
    w_codes = (weight_rows(qw, W_SPEC).double() / sw).round()
    w_ref = ref_dequant(ref_codes_taking_ties(wr, sw, 4, w_codes), sw, None).reshape(6, 21)
    xr = ref_act_rows(x.double(), "token")
    sx, _ = ref_minmax(xr, 8, True)
    x_codes = (act_rows(qx, A_SPEC).double() / sx).round()
    x_ref = ref_dequant(ref_codes_taking_ties(xr, sx, 8, x_codes), sx, None).reshape(x.shape)
    torch.testing.assert_close(y.double(), F.linear(x_ref, w_ref, lin.bias.double()), rtol=1e-5, atol=1e-5)


def test_quantlinear_autocast_bf16():
    torch.manual_seed(1)
    lin = nn.Linear(21, 6)
    ql = QuantLinear.from_linear(lin, W_SPEC, A_SPEC)
    x = rand_act((2, 5, 21), "ql-ac").requires_grad_(True)
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
    # On the qmax grid (absmax / qmax) min/max fake quant is a projection: over the baked linear it changes nothing.
    # The full signed range is not one (a baked row's absmax can be 8 steps, re-read as 7.5), as in
    # compressed-tensors.
    x = rand_act((3, 21), "ql-baked")
    old = TensorSpec(bits=4, granularity="group", group_size=7, sym_range="qmax")
    baked_old = QuantLinear.from_linear(lin, old).to_linear(fake_quantized=True)
    qw_old = WeightQuantizer(old, lin.weight)(lin.weight)
    assert torch.equal(QuantLinear.from_linear(baked_old, old)(x), F.linear(x, qw_old, lin.bias))


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
    x = rand_act((4, 21), "ql-sd")
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
    x0 = rand_act((3, 8), "calib-0")
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(x0)
    batches = [x0, 3.0 * rand_act((5, 8), "calib-1"), 0.5 * rand_act((2, 8), "calib-2")]
    with torch.no_grad():
        hidden = [F.gelu(first(b)) for b in batches]
    with calibrate(model):
        for b, h in zip(batches, hidden):  # observing only: the input passes through unquantized
            assert torch.equal(model(b), ql.to_linear(fake_quantized=True)(h))
    absmax = max(float(h.abs().amax()) for h in hidden)
    assert absmax != float(hidden[0].abs().amax()) and absmax != float(hidden[-1].abs().amax())
    scale = ql.input_quantizer.scale
    assert scale.shape == (1,)
    torch.testing.assert_close(scale.double(), torch.tensor([absmax / 127.5], dtype=F64), rtol=1e-6, atol=0)
    # after calibration: a fixed per-tensor grid, values beyond the calibrated range clip to its ends
    h = torch.cat([2.0 * hidden[1], -2.0 * hidden[1]])
    out = ql.input_quantizer(h)
    s = scale.double()
    ref = torch.round(h.double() / s).clamp(-128, 127) * s
    tie = ref_near_tie(h.double(), s)
    assert ((out.double() - ref).abs()[~tie] <= 1e-6 * (ref.abs()[~tie] + s)).all()
    assert out.max() == 127 * scale and out.min() == -128 * scale


"""PTQ algorithms against float64 references on small random problems (tests/test_ptq_model.py runs them
end to end on a tiny random Llama)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from qat.linear import QuantLinear
from qat.ptq import Int8OutlierLinear, PTQConfig
from qat.ptq.awq import search_clip, search_scale
from qat.ptq.gptq import GPTQ, GPTQConfig, gptq
from qat.ptq.grid import freeze, frozen_spec, output_error, rtn
from qat.ptq.hqq import hqq
from qat.runtime.llm_int8 import EPS
from qat.spec import parse

F64 = torch.float64


def correlated(n=1024, d=64, seed=0, outliers=4, sample_seed=None):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d, dtype=F64) + torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    if sample_seed is not None:
        g.manual_seed(sample_seed)
    x = torch.randn(n, d, generator=g, dtype=F64) @ mix
    x[:, :outliers] *= 8.0  # a few outlier channels, as in LLM activations
    return x


def weight(out=32, d=64, seed=1):
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------
# Algorithms against float64 references.


@pytest.mark.parametrize("scheme", ["w4", "w4g16", "w3g16asym"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(scheme, act_order):
    spec = parse(scheme).weight
    x, w = correlated(), weight()
    h = x.T @ x / len(x)
    q_rtn = rtn(w, spec)[0].double()
    q, codes, scale, zero = gptq(w, h, spec, act_order=act_order)
    assert q.dtype == F64
    assert output_error(w, q, h) < 0.6 * output_error(w, q_rtn, h)
    # Held-out inputs from the same distribution: still better (no overfitting).
    xt = correlated(sample_seed=5)
    assert output_error(w, q, xt.T @ xt / len(xt)) < output_error(w, q_rtn, xt.T @ xt / len(xt))


@pytest.mark.parametrize("scheme", ["w4", "w4g32", "w3g32asym"])
def test_gptq_defaults_generalise_when_calibration_underrepresents_directions(scheme):
    """The bundled model's failure, in float64: GPTQ pushes rounding error into input directions the
    calibration set barely excites (a quarter of them, 50x weaker in calibration, only 5x weaker in held-out
    text, as news vs Wikipedia activations of down_proj). With the paper's damp 0.01 and no act-order it then
    loses to RTN on held-out inputs while winning on the calibration set; PTQConfig's defaults (damp 0.1,
    act-order) keep the win on held-out inputs."""
    d = 128
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=F64))[0]

    def inputs(n, weak, seed):
        sv = torch.ones(d, dtype=F64)
        sv[-d // 4:] = weak**0.5
        return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64) * sv) @ basis.T

    xc, xt = inputs(1024, 0.02, 1), inputs(16384, 0.2, 2)
    hc, ht = xc.T @ xc / len(xc), xt.T @ xt / len(xt)
    w = weight(32, d, seed=3)
    spec = parse(scheme).weight
    q_rtn = rtn(w, spec)[0].double()
    cfg = PTQConfig().gptq
    q = gptq(w, hc, spec, damp=cfg.damp, act_order=cfg.act_order)[0]
    assert output_error(w, q, hc) < 0.7 * output_error(w, q_rtn, hc)
    assert output_error(w, q, ht) < 0.95 * output_error(w, q_rtn, ht)
    q_paper = gptq(w, hc, spec, damp=0.01, act_order=False)[0]  # the previous defaults
    assert output_error(w, q_paper, hc) < 0.7 * output_error(w, q_rtn, hc)
    assert output_error(w, q_paper, ht) > output_error(w, q_rtn, ht)


@pytest.mark.parametrize("scheme", ["w4", "w3g16"])
def test_gptq_clip_shrinks_the_grid_and_lowers_the_output_error(scheme):
    """`ptq.gptq.clip`: on Gaussian weights min/max spends the grid on each row's few largest entries; the
    clipping search takes smaller scales and GPTQ's output error falls, on the calibration inputs and on
    held-out ones. A scale method the spec names is left alone."""
    spec = parse(scheme).weight
    x, xt = correlated(outliers=0), correlated(outliers=0, sample_seed=5)
    h, ht = x.T @ x / len(x), xt.T @ xt / len(xt)
    w = weight()
    q0, _, s0, _ = GPTQ(GPTQConfig(clip=False)).round(w, spec, h)
    q1, _, s1, _ = GPTQ(GPTQConfig(clip=True)).round(w, spec, h)
    assert bool((s1 <= s0).all()) and float((s1 < s0).float().mean()) > 0.5
    # (on the qmax grid the search cut the error by more than 15% at w4; the full signed range wastes less of min/max's
    # grid, so less is left to gain)
    assert output_error(w, q1, h) < 0.95 * output_error(w, q0, h)
    assert output_error(w, q1, ht) < 0.95 * output_error(w, q0, ht)
    # clip=False is the plain algorithm; a percentile spec keeps its own scales with clip on
    assert torch.equal(q0, gptq(w, h, spec, damp=0.1, act_order=True, scale_dtype=F64)[0])
    pct = replace(spec, scale_method="percentile", percentile=99.0)
    kept = GPTQ(GPTQConfig(clip=True)).round(w, pct, h)[2]
    assert torch.equal(kept, GPTQ(GPTQConfig(clip=False)).round(w, pct, h)[2])


@pytest.mark.parametrize("scheme,act_order,static", [("w4g16", True, True), ("w4g16asym", False, False),
                                                     ("w3asym", False, True), ("w4g16", False, True)])
def test_gptq_codes_frozen_bit_for_bit(scheme, act_order, static):
    """The QuantLinear's quantizer gives back exactly the codes GPTQ chose, and forward uses them."""
    spec = frozen_spec(parse(scheme)).weight
    x, w = correlated(), weight()
    lin = nn.Linear(64, 32, bias=False)
    lin.weight.data = w.float()
    q = QuantLinear.from_linear(lin, spec)
    deq, codes, scale, zero = gptq(lin.weight, (x.T @ x / len(x)).float(), spec, act_order=act_order,
                                   static_groups=static, scale_dtype=torch.float32)
    freeze(q, deq, scale, zero)
    got, s, z = q.weight_quantizer.quantize(q.weight)
    assert torch.equal(got, codes)
    # The stored weight sits on its grid: fake quant gives it back (to an ulp: the lsq scale passes through
    # _grad_scale, whose forward x - x*g + x*g is not always bit-exact in fp32).
    torch.testing.assert_close(q.quantized_weight().detach(), q.weight.detach(), rtol=1e-6, atol=0)


def test_awq_scales_lower_output_error_than_rtn():
    spec = parse("w3g16").weight
    x, w = correlated(outliers=6), weight()
    h = x.T @ x / len(x)
    s, errors = search_scale([w], h, x.abs().mean(0), spec, grid=20)
    q_awq = rtn(w * s, spec)[0].double() / s  # X/s @ Q(W s)^T, s folded into the previous op
    q_rtn = rtn(w, spec)[0].double()
    assert errors[0.0] == pytest.approx(output_error(w, q_rtn, h))
    assert output_error(w, q_awq, h) < 0.9 * output_error(w, q_rtn, h)
    # The clipping search (per row and group, like the reference: cross-group terms of H are ignored) on
    # inputs without cross-channel correlation, where that objective is exact: never worse, usually better.
    xi = torch.randn(2048, 64, generator=torch.Generator().manual_seed(2), dtype=F64)
    hi = xi.T @ xi / len(xi)
    clipped = search_clip(w, hi, spec)
    assert not torch.equal(clipped, w)
    assert output_error(w, rtn(clipped, spec)[0].double(), hi) < output_error(w, q_rtn, hi)


def test_hqq_lowers_weight_error_vs_rtn():
    w = weight(64, 128)
    w[:, 3] *= 6  # heavy-tailed rows, where HQQ's outlier-robust fit helps
    for scheme in ("w4g32asym", "w3g32asym", "w4g32", "w3"):
        spec = parse(scheme).weight
        e_rtn = torch.linalg.norm(rtn(w, spec)[0].double() - w)
        deq, codes, s, z = hqq(w, spec, iters=20)
        assert torch.linalg.norm(deq - w) < e_rtn, scheme
        # The codes and (integer) zero points reproduce deq on the spec's grid.
        from qat.quantizers import dequantize_codes, weight_rows
        again = dequantize_codes(weight_rows(codes, spec), s, z, spec).reshape(w.shape)
        torch.testing.assert_close(again.double(), deq, rtol=1e-6, atol=1e-6)


def reference_llm_int8(x: torch.Tensor, w: torch.Tensor, threshold: float, bias=None) -> torch.Tensor:
    """Float64 reference of LLM.int8()'s computation (Int8OutlierLinear), written out apart from it."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    w = w.double()
    cols = (x2.abs() > threshold).any(0)
    xr = x2.masked_fill(cols, 0)
    xs = (xr.abs().amax(-1, keepdim=True) / 127).clamp_min(EPS)
    ws = (w.abs().amax(-1, keepdim=True) / 127).clamp_min(EPS)
    xq = torch.round(xr / xs).clamp(-127, 127)
    wq = torch.round(w / ws).clamp(-127, 127)
    y = (xq @ wq.t()) * xs * ws.t() + x2[:, cols] @ w[:, cols].t()
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], w.shape[0])


def test_llm_int8_equals_fp_matmul_when_threshold_covers_all_columns():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, dtype=F64)
    x = torch.randn(3, 5, 64, dtype=F64)
    m = Int8OutlierLinear.from_linear(lin, threshold=0.0)
    torch.testing.assert_close(m(x), lin(x), rtol=1e-12, atol=1e-12)


def test_llm_int8_matches_float64_reference():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(2, 7, 64)
    x[..., [3, 17]] *= 20  # outlier features above 6.0
    m = Int8OutlierLinear.from_linear(lin, threshold=6.0)
    assert int(m.outlier_columns(x.reshape(-1, 64)).sum()) >= 2
    ref = reference_llm_int8(x, lin.weight, 6.0, lin.bias)
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    err = (m(x) - lin(x)).abs().max() / lin(x).abs().max()
    assert err < 0.02


def test_llm_int8_fast_path_arithmetic_on_cpu(monkeypatch):
    """The CUDA path's arithmetic (torch._int_mm with int32 accumulation, fp32 rescale, fp16 outliers),
    forced on CPU where torch._int_mm exists too: exact integer products, and close to the reference."""
    from qat.runtime.llm_int8 import int_matmul

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    exact = a.long() @ b.long().t()
    fast = int_matmul(a, b, fast=True)
    assert fast.dtype == torch.int32 and torch.equal(fast.long(), exact)
    assert torch.equal(int_matmul(a, b, fast=False).long(), exact)

    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *t: calls.append(1) or real(*t))
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(32, 64)
    x[:, 5] *= 20
    ref = Int8OutlierLinear.from_linear(lin, 6.0)(x)
    m = Int8OutlierLinear.from_linear(lin, 6.0)
    m.fast_path = True
    got = m(x)
    assert calls, "the fast path did not reach torch._int_mm"
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    # fp16 outliers and fp32 rescaling differ from the float64 reference, but only by rounding.
    assert 0 < (got - ref).abs().max() < 1e-2


@pytest.mark.cuda
def test_llm_int8_cuda_matches_cpu():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(32, 64)
    x[:, 5] *= 20
    cpu = Int8OutlierLinear.from_linear(lin, 6.0)(x)
    gpu = Int8OutlierLinear.from_linear(copy.deepcopy(lin).cuda(), 6.0)(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-2, atol=1e-2)

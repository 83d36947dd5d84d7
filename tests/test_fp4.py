"""FP4 (e2m1) with NVFP4 and MXFP4 block scales against float64 references: every representable value, ties,
saturation, e4m3 subnormal block scales, power-of-two tensor scales, compressed-tensors' MX exponent, STE and LSQ
gradients, the spec language, and a quantized model training step."""

from __future__ import annotations

import math

import pytest
import torch
from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales
from helpers.models import tiny_llama

from qat.apply import quantize_model
from qat.fp4 import (
    E2M1_VALUES,
    fp4_codes,
    fp4_round,
    fp4_values,
    mxfp4_exponent,
    mxfp4_exponents,
    nvfp4_round_scale,
    nvfp4_split,
)
from qat.quantizers import ActQuantizer, WeightQuantizer, dequantize_codes, fake_quant, quantize_codes, weight_rows
from qat.spec import SpecError, TensorSpec, parse

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def ref_e2m1(y: float) -> float:
    """Nearest e2m1 value in float64, ties to the even mantissa (codes 0, 2, 4, 6), saturating at 6."""
    a = min(abs(y), 6.0)
    best = min(range(8), key=lambda i: (abs(E2M1[i] - a), i % 2))
    return math.copysign(E2M1[best], y)


def e4m3_values() -> list[float]:
    """Every non-negative finite e4m3fn value, in float64 (exponent bias 7, subnormals 2^-6 * m/8, max 448)."""
    out = [m / 8 * 2.0**-6 for m in range(8)]
    out += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    return out


E4M3 = e4m3_values()


def ref_e4m3(v: float) -> float:
    """Nearest e4m3 value (ties to the even mantissa), saturating at 448."""
    v = min(v, 448.0)
    return min(E4M3, key=lambda c: (abs(c - v), round(c / _ulp(c)) % 2))


def _ulp(c: float) -> float:
    if c < 2.0**-6:
        return 2.0**-9
    return 2.0 ** (math.floor(math.log2(c)) - 3)


def test_every_e2m1_value_ties_and_saturation_against_float64():
    grid = torch.arange(-7.0, 7.0 + 1e-9, 0.125, dtype=torch.float64)  # every tie (odd multiples of 0.25) and more
    dense = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    ys = torch.cat([grid, dense, torch.tensor([6.0001, 1e6, -1e6, 0.2499999, 0.2500001])]).float()
    got = fp4_round(ys)
    want = torch.tensor([ref_e2m1(float(y)) for y in ys.double()])
    assert torch.equal(got.double(), want)
    for v in E2M1:  # every representable value is a fixed point, with either sign, and codes round-trip
        t = torch.tensor([v, -v])
        assert torch.equal(fp4_round(t), t)
        assert torch.equal(fp4_values(fp4_codes(t)), t)
    codes = torch.arange(16, dtype=torch.int32)
    vals = fp4_values(codes)
    assert torch.equal(vals[:8], E2M1_VALUES) and torch.equal(vals[9:], -E2M1_VALUES[1:])
    assert torch.isnan(fp4_round(torch.tensor([float("nan")]))).all()


def test_nvfp4_block_scales_power_of_two_global_and_e4m3_subnormals():
    gen = torch.Generator().manual_seed(0)
    # 64 blocks whose maxima span 2^-16 .. 2^4, so low blocks fall into e4m3's subnormals under the tensor scale.
    amax = torch.exp2(torch.rand(64, 1, generator=gen) * 20 - 16)
    amax[3] = 0.0
    eff = nvfp4_round_scale(amax / 6.0)
    raw = [float(a) / 6.0 for a in amax.double()]
    k = max(j for j in range(-130, 130) if max(raw) * 2.0**j <= 448.0)
    want = [max(ref_e4m3(r * 2.0**k), 2.0**-9) / 2.0**k for r in raw]
    assert torch.equal(eff.double().flatten(), torch.tensor(want, dtype=torch.float64))
    assert max(raw) * 2.0**k > 224.0  # the largest block uses the top binade of e4m3
    assert sum(r * 2.0**k < 2.0**-6 for r in raw) >= 5  # and some blocks are e4m3 subnormals
    s, g = nvfp4_split(eff)
    assert g.numel() == 1 and torch.equal(s.float() / g, eff.flatten().reshape(eff.shape).float().view_as(s.float()))
    with pytest.raises(ValueError, match="not e4m3 values"):
        nvfp4_split(eff * 1.01)


def test_mxfp4_exponent_matches_compressed_tensors_and_float64():
    gen = torch.Generator().manual_seed(1)
    amax = torch.exp2(torch.rand(4096, generator=gen) * 60 - 30)
    amax = torch.cat([amax, torch.tensor([1.75, 1.7499999, 3.5, 1.0, 6.0, 7.0, 2.0**-120])])
    ours = mxfp4_exponent(amax)
    ct = generate_mx_scales(amax.float(), num_bits=4).to(torch.int32) - 127
    assert torch.equal(ours, ct)
    for a, e in zip(amax.double().tolist(), ours.tolist()):
        top = math.floor(math.log2(a))
        top += a / 2.0**top >= 1.75
        assert e == top - 2
    assert torch.equal(mxfp4_exponents(torch.exp2(ours.float())).to(torch.int32), ours + 127)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fake_quant_weights_and_activations_against_float64(fmt):
    spec = parse(fmt)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(24, 96, generator=gen)
    w[5, 7] = 40.0  # an outlier block
    out = WeightQuantizer(spec.weight, w)(w)
    rows = weight_rows(w, spec.weight)
    amax = rows.abs().amax(-1, keepdim=True)
    eff = _ref_scales(amax.double(), fmt, per=rows.shape[0])
    y = (rows / eff.float()).double()  # the division as fp32 does it, then the format's rounding in float64
    want = torch.tensor([[ref_e2m1(v) for v in r] for r in y.tolist()], dtype=torch.float64) * eff
    assert torch.equal(out.double().reshape(want.shape), want)
    # activations: each token has its own tensor scale (NVFP4), blocks along the last dimension
    x = torch.randn(2, 5, 96, generator=gen) * torch.exp2(torch.arange(5.0))[None, :, None]
    xq = ActQuantizer(spec.activation)(x)
    for t in range(5):
        tok = x[1, t].reshape(-1, spec.activation.group_size)
        eff = _ref_scales(tok.abs().amax(-1, keepdim=True).double(), fmt, per=tok.shape[0])
        y = (tok / eff.float()).double()
        want = torch.tensor([[ref_e2m1(v) for v in r] for r in y.tolist()], dtype=torch.float64) * eff
        assert torch.equal(xq[1, t].double(), want.flatten())
    codes = quantize_codes(rows, *WeightQuantizer(spec.weight, w).qparams(w), spec.weight)
    assert codes.min() >= 0 and codes.max() <= 15
    scale, _ = WeightQuantizer(spec.weight, w).qparams(w)
    assert torch.equal(dequantize_codes(codes, scale, None, spec.weight).reshape(w.shape), out)


def _ref_scales(amax: torch.Tensor, fmt: str, per: int) -> torch.Tensor:
    vals = amax.flatten().tolist()
    if fmt == "mxfp4":
        out = []
        for a in vals:
            top = math.floor(math.log2(a))
            top += a / 2.0**top >= 1.75
            out.append(2.0 ** (top - 2))
        return torch.tensor(out, dtype=torch.float64).reshape(amax.shape)
    out = []
    for i in range(0, len(vals), per):
        raw = [a / 6.0 for a in vals[i : i + per]]
        k = max(j for j in range(-130, 130) if max(raw) * 2.0**j <= 448.0)
        out += [max(ref_e4m3(r * 2.0**k), 2.0**-9) / 2.0**k for r in raw]
    return torch.tensor(out, dtype=torch.float64).reshape(amax.shape)


def test_ste_gradients_and_saturation_mask():
    spec = parse("mxfp4").activation
    # A block whose max is 1.7 x 2^2 takes the scale 2^0: 6.8 saturates to 6 and gets no gradient.
    x = torch.tensor([[6.8] + [0.3] * 31, [1.0] + [0.1] * 31], requires_grad=True)
    out = fake_quant(x, spec)
    assert out[0, 0].item() == 6.0
    g = torch.randn_like(x)
    out.backward(g)
    mask = torch.ones_like(x)
    mask[0, 0] = 0.0
    assert torch.equal(x.grad, g * mask)


def test_lsq_block_scale_gradient_and_rounding():
    spec = TensorSpec(bits=4, granularity="group", group_size=16, format="nvfp4", learnable="lsq")
    w = torch.randn(4, 32, dtype=torch.float32)
    q = WeightQuantizer(spec, w)
    scale, _ = q.qparams(w)
    s, g = nvfp4_split(scale.detach())  # LSQ scales stay storable: e4m3 over a power of two
    assert torch.equal(s.float() / g, scale.detach().float())
    out = q(w)
    out.sum().backward()
    # LSQ: d out / d eff per block sums q(y) - y inside the range and q(y) = +-6 where y saturates, times LSQ's
    # gradient scale
    eff = scale.detach().double()
    y = (weight_rows(w, spec) / scale.detach()).double()
    qy = torch.tensor([[ref_e2m1(v) for v in r] for r in y.tolist()], dtype=torch.float64)
    gscale = 1.0 / math.sqrt(16 * spec.qmax)
    want = torch.where(y.abs() < 6, qy - y, qy).sum(-1, keepdim=True) * gscale
    assert bool((y.abs() > 6).any())  # some block's e4m3 scale rounded down, so its max saturates
    assert torch.allclose(q.scale.grad.double(), want, atol=1e-5)
    assert eff.numel() == 8


def test_spec_language():
    assert parse("nvfp4").name == "nvfp4" and parse("mxfp4").name == "mxfp4"
    assert parse("wnvfp4").activation is None and parse("wnvfp4").name == "wnvfp4"
    assert parse("wmxfp4a8").activation.format == "int"
    w4a4 = parse("w4a4kv4")
    assert (w4a4.activation.bits, w4a4.activation.granularity, w4a4.kv.bits) == (4, "token", 4)
    for bad, msg in [("wnvfp4g32", "fixes its own blocks"), ("w4kvnvfp4", "use int for the kv cache")]:
        with pytest.raises(SpecError, match=msg):
            parse(bad)
    with pytest.raises(SpecError, match="group_size=16"):
        TensorSpec(bits=4, granularity="group", group_size=32, format="nvfp4").check("weight")
    with pytest.raises(SpecError, match="lwc"):
        TensorSpec(bits=4, granularity="group", group_size=32, format="mxfp4", learnable="lwc").check("weight")


def test_model_trains_at_nvfp4_and_refuses_blocks_that_do_not_divide():
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, inter=128)
    quantize_model(model, parse("nvfp4"))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    odd = tiny_llama(hidden=64, inter=120)
    with pytest.raises(SpecError, match="do not divide in_features=120"):
        quantize_model(odd, parse("mxfp4"))

"""quantize_model on tiny random Llama / Qwen2 / Mistral / Gemma models: surgery, gradients, KV quant, reload."""

import pytest
import torch
from torch import nn

from qat import kv as kv_quant
from qat.apply import calibrate, quant_spec_of, quantize_model
from qat.keys import QUANT_KEY
from qat.linear import QuantLinear
from qat.load import load
from qat.quantizers import ActQuantizer
from qat.spec import QuantSpec, SpecError, TensorSpec, parse

FAMILIES = ["llama", "qwen2", "mistral", "gemma", "gemma3"]


def ids(batch=2, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_surgery_gradients_generation_reload(family, tiny_model, tmp_path):
    model = tiny_model(family)
    x = ids()
    ref = model(x).logits
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    report = quantize_model(model, "w4a8kv8")

    # Every linear but lm_head is a QuantLinear now, with the spec of the scheme.
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == {n for n in linears if n != "lm_head"}
    assert report.skipped == ["lm_head"] and len(report.replaced) == len(quantized)
    assert type(model.lm_head) is nn.Linear
    assert len(report.kv_modules) == model.config.num_hidden_layers
    assert getattr(model.config, QUANT_KEY)["weight"]["bits"] == 4

    # Finite logits that differ from full precision (quantization did something).
    out = model(x).logits
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-3

    # A backward pass reaches every trainable parameter.
    out.float().logsumexp(-1).mean().backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, missing

    # Generation with KV quant on.
    gen = model.generate(x[:1, :6], max_new_tokens=8, do_sample=False)
    assert gen.shape == (1, 14)

    # Save + reload reproduces logits exactly.
    model.save_pretrained(tmp_path / "q")
    again = load(tmp_path / "q")
    assert quant_spec_of(again) == quant_spec_of(model)
    assert torch.equal(again(x).logits, model(x).logits)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("scheme", ["w8a8kv4", "w8a8kv4asym"])
def test_cached_decoding_matches_full_forward_with_kv_quant(family, scheme, tiny_model):
    """Per-token KV scales depend on each token alone, so a growing cache gives the full-sequence logits. (The KV
    cache keeps the qmax grid by default: on the full signed range a row's negative absmax sits at -7.5 steps, a tie
    that one ulp of difference between the cached and the full forward's K rounds either way.)"""
    model = tiny_model(family)
    spec = parse(scheme)
    assert spec.kv.sym_range == ("full" if scheme.endswith("asym") else "qmax")
    quantize_model(model, spec)
    x = ids(1, 16)
    full = model(x).logits
    out = model(x[:, :10], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(10, 16):
        out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_kv_quant_changes_attention_and_sdpa_equals_eager(tiny_model):
    x = ids()
    base = tiny_model("llama")
    ref = base(x).logits
    outs = {}
    for bits in (8, 2):
        m = tiny_model("llama")
        quantize_model(m, QuantSpec(weight=None, kv=TensorSpec(bits=bits, granularity="head"), include=["none"]))
        outs[bits] = m(x).logits
    assert (outs[2] - ref).abs().max() > 10 * (outs[8] - ref).abs().max() > 0
    eager = tiny_model("llama", attn="eager")
    quantize_model(eager, QuantSpec(weight=None, kv=TensorSpec(bits=2, granularity="head"), include=["none"]))
    assert eager.config._attn_implementation == "distqat_kv_eager"
    torch.testing.assert_close(eager(x).logits, outs[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gran", ["token", "head"])
def test_kv_rows_quantize_per_token_or_per_head(gran):
    torch.manual_seed(0)
    k = torch.randn(2, 3, 5, 8, dtype=torch.float64).float()
    q = ActQuantizer(TensorSpec(bits=4, granularity=gran).check("kv"))  # the kv default: absmax / qmax
    out = kv_quant.fake_quant_kv(q, k)
    # Reference: each (b, t) token across heads, or each (b, h, t) head vector, on its own absmax grid.
    ref = torch.empty_like(k)
    for b in range(2):
        for t in range(5):
            for h in range(3):
                v = k[b, :, t, :] if gran == "token" else k[b, h, t, :]
                s = v.double().abs().max() / 7
                ref[b, h, t] = ((k[b, h, t].double() / s).round().clamp(-8, 7) * s).float()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_include_exclude_and_overrides(tiny_model):
    model = tiny_model("llama")
    spec = parse("w4a8")
    spec.overrides = {"*.down_proj": "w8a8", "*.self_attn.o_proj": "w4g32"}
    quantize_model(model, spec, exclude=["lm_head", "model.layers.1.*"])
    layer0, layer1 = model.model.layers[0], model.model.layers[1]
    assert layer0.mlp.down_proj.weight_spec.bits == 8
    assert layer0.self_attn.o_proj.weight_spec.group_size == 32 and layer0.self_attn.o_proj.act_spec is None
    assert layer0.mlp.up_proj.weight_spec.bits == 4
    assert not isinstance(layer1.mlp.up_proj, QuantLinear)


def test_errors(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="nothing was quantized"):
        quantize_model(model, "w4", include=["no.such.layer"])
    with pytest.raises(SpecError, match="does not divide in_features=64"):
        quantize_model(tiny_model("llama"), "w4g48")
    quantize_model(model, "w4")
    with pytest.raises(ValueError, match="quantized already"):
        quantize_model(model, "w4")

    class NoBackend(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.config = type("C", (), {"_attn_implementation": "sdpa"})()

    with pytest.raises(ValueError, match="AttentionInterface"):
        quantize_model(NoBackend(), "w4a8kv8")


def test_static_activation_scales_calibrate_and_reload(tiny_model, tmp_path):
    model = tiny_model("llama")
    spec = QuantSpec(weight=TensorSpec(bits=8), activation=TensorSpec(bits=8, granularity="tensor", dynamic=False))
    quantize_model(model, spec)
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(ids())
    with calibrate(model):
        for s in range(3):
            model(ids(seed=s))
    q = model.model.layers[0].mlp.up_proj.input_quantizer
    assert q.scale.item() == pytest.approx(q.absmax.item() / 127.5)
    out = model(ids())
    model.save_pretrained(tmp_path / "s")
    assert torch.equal(load(tmp_path / "s")(ids()).logits, out.logits)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_linears_reading_one_tensor_quantize_it_once(family, tiny_model):
    """q/k/v and gate/up read the same tensor: with the model's SharedInput its fake quant runs once per
    group (4 of 7 input quantizers per layer), with the same logits and gradients as running all 7."""
    from qat.linear import QuantLinear

    def run(share: bool):
        model = tiny_model(family).double()
        quantize_model(model, "w4a8kv8")
        calls = []
        for n, m in model.named_modules():
            if isinstance(m, QuantLinear):
                if not share:
                    m.input_quantizer.shared = None
                m.input_quantizer.register_forward_hook(lambda mod, a, o, n=n: calls.append(n))
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        logits = model(ids).logits
        (logits.double() ** 2).mean().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        memo = next(m.input_quantizer.shared for m in model.modules() if isinstance(m, QuantLinear))
        return logits.detach(), grads, calls, memo

    logits, grads, calls, memo = run(True)
    ref_logits, ref_grads, ref_calls, _ = run(False)
    layers = 2
    assert len(ref_calls) == 7 * layers
    assert len(calls) == 4 * layers
    assert sorted(c.rsplit(".", 1)[-1] for c in calls[:4]) == ["down_proj", "gate_proj", "o_proj", "q_proj"]
    assert memo.x is None and memo.out is None  # cleared after the model's forward
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for k in grads:  # only the order of summing the three readers' gradients differs
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-12, atol=1e-12)

"""PTQ over fused MoE experts (qat/ptq/moe.py): each expert rounded on the tokens routed to it.

Tiny random Qwen3-MoE ((E, 2I, H) storage), gpt-oss (transposed, interleaved gate/up, biases) and Qwen2-MoE (a shared
expert and its gate) models: GPTQ per expert beats RTN on held-out tokens, equals the GPTQ solver called directly on
each expert's routed inputs, falls back to the pooled Hessian below its threshold and says so in the report; RTN, HQQ
and rotate+GPTQ reload with the same logits; the rotation keeps the logits and the routing; AWQ and SmoothQuant fold
exactly (router and shared expert compensated) and beat their baselines; AQLM and LLM.int8() refuse in one line.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import transformers as tf

from qat.apply import quantize_model
from qat.experts import expert_loop
from qat.linear import QuantLinear
from qat.load import load
from qat.ptq import PTQConfig, run_ptq
from qat.ptq.blocks import block_groups, capture_inputs, capture_routed, collect, quantizers_off, run_block
from qat.ptq.config import AWQConfig, GPTQConfig, RotateConfig
from qat.ptq.gptq import gptq
from qat.ptq.moe import down_inputs, experts_off, quantized_experts
from qat.ptq.registry import build
from qat.ptq.rotate import rotate_model
from qat.spec import parse
from tests.helpers.moe import build_tiny

FAMILIES = ("qwen3_moe", "gpt_oss")
REFUSED = {"aqlm": "w4", "llm_int8": "w8a8"}  # method: a scheme it takes


def tiny_moe(family: str, seed: int = 0) -> tf.PreTrainedModel:
    """A 2-layer MoE of 4 experts (top 2), hidden 64, weights at init range 0.1; gpt-oss with random biases."""
    c = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, initializer_range=0.1)
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**c, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                num_experts_per_tok=2)
    elif family == "qwen2_moe":  # a shared expert and its gate beside the routed experts
        cfg = tf.Qwen2MoeConfig(**c, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                num_experts=4, num_experts_per_tok=2)
    else:
        cfg = tf.GptOssConfig(**c, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                              layer_types=["sliding_attention", "full_attention"],
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("_proj_bias"):
                p.normal_(0, 0.1)
    return model


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (n, 32), generator=torch.Generator().manual_seed(seed))


def experts_calls(model, x: torch.Tensor) -> dict[int, list[tuple]]:
    """Each layer's experts-module call arguments (hidden states, top-k index, top-k weights) over `x`."""
    got: dict[int, list[tuple]] = {}
    hooks = [layer.mlp.experts.register_forward_pre_hook(
        lambda m, a, i=i: got.setdefault(i, []).append(tuple(t.detach() for t in a)))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


def ptq(fp, method: str, calib: torch.Tensor, scheme: str = "w4", **gptq_cfg) -> tuple:
    model = copy.deepcopy(fp)
    cfg = PTQConfig(method=method, progress=False, device="cpu", gptq=GPTQConfig(**gptq_cfg))
    return run_ptq(model, parse(scheme), cfg, calib)


def mlp_inputs(model, x: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """Each layer's residual stream before its post-attention norm, over `x`."""
    got: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.post_attention_layernorm.register_forward_pre_hook(
        lambda m, a, i=i: got.setdefault(i, []).append(a[0].detach())) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


def moe_errors(fp, model, held: dict[int, list[torch.Tensor]]) -> list[float]:
    """Per layer, the squared error of norm -> MoE block (router, experts, shared expert) against the FP layer's, both
    fed the FP model's held-out residual stream (a transform's folds into the norm and router included)."""
    def out(layer, h):
        o = layer.mlp(layer.post_attention_layernorm(h))
        return o[0] if isinstance(o, tuple) else o

    with torch.no_grad():
        return [sum(float((out(model.model.layers[i], h) - out(fp.model.layers[i], h)).pow(2).sum()) for h in hs)
                for i, hs in held.items()]


@pytest.mark.parametrize("family,scheme,better,worse,outliers", [
    ("qwen3_moe", "w4", "gptq", "rtn", False), ("gpt_oss", "w4", "gptq", "rtn", False),
    ("qwen3_moe", "w3", "awq+rtn", "rtn", False), ("gpt_oss", "w3", "awq+rtn", "rtn", False),
    ("qwen2_moe", "w8a8", "smoothquant+rtn", "rtn", True), ("gpt_oss", "w8a8", "smoothquant+rtn", "rtn", True)])
def test_method_beats_baseline_on_held_out_tokens(family, scheme, better, worse, outliers):
    """GPTQ per expert beats RTN, AWQ (scales searched on the routed tokens) beats its rounding alone, SmoothQuant
    beats RTN where the MoE input has outlier channels: every layer, on held-out tokens."""
    fp = tiny_moe(family)
    if outliers:
        with torch.no_grad():
            for layer in fp.model.layers:
                layer.post_attention_layernorm.weight[[3, 17, 40]] *= 30
    held = mlp_inputs(fp, ids(8, seed=2))
    errors = {m: moe_errors(fp, ptq(fp, m, ids(16, seed=1), scheme)[0], held) for m in (better, worse)}
    for layer, (e_better, e_worse) in enumerate(zip(errors[better], errors[worse])):
        assert e_better < 0.85 * e_worse, (layer, errors)


def _reference_layer0(fp, model, family: str, calib: torch.Tensor, sequential: bool, ratio: float, c: GPTQConfig):
    """Layer 0's experts rounded by calling the GPTQ solver directly on each expert's routed inputs."""
    # The experts' inputs: the FP layer's, or (sequential) those of the layer with its attention rounded first.
    (x, index, _), = experts_calls(model if sequential else fp, calib)[0]
    mod = model.model.layers[0].mlp.experts
    fp_mod = fp.model.layers[0].mlp.experts
    spec = parse("w4").weight
    up_w = fp_mod.gate_up_proj.detach()
    down_w = fp_mod.down_proj.detach()
    if family == "gpt_oss":  # stored (E, in, out)
        up_w, down_w = up_w.transpose(1, 2), down_w.transpose(1, 2)
    w_up_used = mod.quantized_weight("gate_up_proj").detach() if sequential else up_w
    out = {"gate_up_proj": [], "down_proj": []}
    fallbacks = {"gate_up_proj": 0, "down_proj": 0}
    for e in range(4):
        routed = (index == e).any(-1)
        n_e = int(routed.sum())
        for param, w in (("gate_up_proj", up_w), ("down_proj", down_w)):
            own = n_e >= max(1, math.ceil(ratio * w.shape[-1]))
            fallbacks[param] += not own
            xs = x[routed] if own else x
            if param == "down_proj":
                b = fp_mod.gate_up_proj_bias[e] if family == "gpt_oss" else None
                h = torch.nn.functional.linear(xs, w_up_used[e], b)
                gate, up = h.chunk(2, -1)
                xs = fp_mod._apply_gate(h) if family == "gpt_oss" else fp_mod.act_fn(gate) * up
            xs = xs.float()
            hess = xs.T @ xs / xs.shape[0]
            h64 = xs.double().T @ xs.double() / xs.shape[0]
            assert torch.allclose(hess.double(), h64, rtol=1e-4, atol=1e-6)
            out[param].append(gptq(w[e].clone(), hess, spec, c.damp, c.block_size, c.act_order, c.static_groups,
                                   w.dtype))
    return out, fallbacks


@pytest.mark.parametrize("family,sequential", [("qwen3_moe", False), ("gpt_oss", True)])
def test_per_expert_gptq_is_the_solver_on_routed_inputs(family, sequential):
    """Weights and scales equal a direct GPTQ call per expert, bit for bit; a threshold between the experts' token
    counts sends the experts below it to the pooled Hessian, counted per layer in the report."""
    fp = tiny_moe(family)
    calib = ids(8, seed=1)  # one calibration batch: the hooks below see the tensors the block loop saw
    (_, index, _), = experts_calls(fp, calib)[0]
    counts = sorted(torch.bincount(index.reshape(-1), minlength=4).tolist())
    ratio = (counts[1] + 0.5) / 64  # the two least-routed experts fall back on gate_up_proj (input width 64)
    model, report = ptq(fp, "gptq", calib, true_sequential=sequential, moe_min_tokens_per_column=ratio)
    c = GPTQConfig()
    ref, fallbacks = _reference_layer0(fp, model, family, calib, sequential, ratio, c)
    assert fallbacks["gate_up_proj"] == 2
    mod = model.model.layers[0].mlp.experts
    for param in ("gate_up_proj", "down_proj"):
        w = mod.canonical(param)
        scale = mod.weight_quantizers[param].scale.reshape(4, -1)
        for e, (deq, _, s, _) in enumerate(ref[param]):
            assert torch.equal(w[e], deq.to(w.dtype)), (param, e)
            assert torch.equal(scale[e], s.reshape(-1)), (param, e)
        row = next(d for d in report.to_dict()["layers"] if d["name"] == f"model.layers.0.mlp.experts.{param}")
        assert row["fallback_experts"] == fallbacks[param]
        assert row["routed_tokens"] == torch.bincount(experts_calls(model if sequential else fp, calib)[0][0][1]
                                                      .reshape(-1), minlength=4).tolist()
    # The forward computes with what was frozen: fake quant of the stored weights gives them back.
    for param in ("gate_up_proj", "down_proj"):
        assert torch.equal(mod.quantized_weight(param), mod.canonical(param))


def test_fallback_count_in_report_with_high_threshold():
    fp = tiny_moe("qwen3_moe")
    _, report = ptq(fp, "gptq", ids(8, seed=1), moe_min_tokens_per_column=1e3)
    d = report.to_dict()
    rows = [r for r in d["layers"] if ".mlp.experts." in r["name"]]
    assert len(rows) == 4 and all(r["fallback_experts"] == 4 and r["experts"] == 4 for r in rows)
    assert d["moe"]["fallback_experts"] == 16
    _, report = ptq(fp, "gptq", ids(8, seed=1), moe_min_tokens_per_column=0.0)
    assert report.to_dict()["moe"]["fallback_experts"] == 0


@pytest.mark.parametrize("family,method", [("gpt_oss", "rtn"), ("qwen3_moe", "hqq"), ("qwen2_moe", "rotate+gptq")])
def test_experts_are_frozen_on_the_grid_and_reload(family, method, tmp_path):
    """RTN puts the experts on the grid as it does linears (each expert row its own scale), so do HQQ and the
    rotated GPTQ; the saved folder reloads with the same logits."""
    fp = tiny_moe(family)
    model, report = ptq(fp, method, ids(2, seed=1))
    mod = model.model.layers[1].mlp.experts
    algorithm = {r["name"]: r["algorithm"] for r in report.layers}["model.layers.1.mlp.experts.down_proj"]
    assert algorithm == method.split("+")[-1]
    for param in ("gate_up_proj", "down_proj"):
        assert torch.equal(mod.quantized_weight(param), mod.canonical(param))
    if method == "rtn":  # each expert row's scale is max(its max / 7, its min / -8) (int4, the signed grid)
        raw = fp.model.layers[1].mlp.experts.down_proj.detach().transpose(1, 2).double()
        want = torch.maximum(raw.amax(-1) / 7, raw.amin(-1) / -8)
        assert torch.allclose(mod.weight_quantizers["down_proj"].scale.reshape(4, -1).double(), want, rtol=1e-7,
                              atol=0)
    x = ids(2, seed=3)
    model.save_pretrained(tmp_path / "q")
    with torch.no_grad():
        again = load(tmp_path / "q", attn_implementation=model.config._attn_implementation)
        assert torch.equal(again(x).logits, model(x).logits)


def test_per_tensor_weights_refused_for_gptq():
    fp = tiny_moe("qwen3_moe")
    spec = parse("w4")
    spec = replace(spec, weight=replace(spec.weight, granularity="tensor"))
    with pytest.raises(ValueError, match="per-tensor weight scale is shared by all the experts"):
        run_ptq(copy.deepcopy(fp), spec, PTQConfig(method="gptq", progress=False, device="cpu"), ids(2, seed=1))


@pytest.mark.parametrize("family", (*FAMILIES, "qwen2_moe"))
def test_rotation_keeps_the_fp_logits_and_the_routing(family):
    """The experts' up and down weights (gpt-oss: transposed, with the down bias), the router and the shared expert
    and its gate turn with the residual stream: same logits to fp32 rounding, every token routed as before."""
    fp = tiny_moe(family)
    turned = copy.deepcopy(fp)
    rotate_model(turned, RotateConfig(kind="random", seed=3))
    x = ids(4, seed=5)
    with torch.no_grad():
        want, got = fp(x).logits.double(), turned(x).logits.double()
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
    for (_, i_fp, w_fp), (_, i_turned, w_turned) in zip(*(
            [c for calls in experts_calls(m, x).values() for c in calls] for m in (fp, turned))):
        assert torch.equal(i_fp, i_turned)
        assert torch.allclose(w_fp, w_turned, atol=1e-5)
    assert not torch.equal(turned.model.layers[0].mlp.experts.down_proj, fp.model.layers[0].mlp.experts.down_proj)


@pytest.mark.parametrize("method", REFUSED)
def test_methods_without_experts_support_refuse_moe_models(method):
    fp = tiny_moe("qwen3_moe")
    cfg = PTQConfig(method=method, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"does not handle fused MoE experts \(model.layers.0.mlp.experts\); use a "
                                         r"method made of .*gptq.* \(e.g. gptq or rotate\+gptq\)$"):
        run_ptq(copy.deepcopy(fp), parse(REFUSED[method]), cfg, ids(2, seed=1))


@pytest.mark.parametrize("family", (*FAMILIES, "qwen2_moe"))
@pytest.mark.parametrize("method", ("awq", "smoothquant"))
def test_transforms_fold_exactly_into_moe_layers(family, method):
    """AWQ (without its clipping) and SmoothQuant fold their scales into the norm before the MoE block, the router
    (compensated), the shared expert and each expert's up -> down: the full-precision layer computes the same."""
    model = tiny_moe(family)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[[3, 17]] *= 30
    spec = parse("w4a8")
    quantize_model(model, spec)
    part = build([method], PTQConfig(awq=AWQConfig(clip=False)))[0]
    inputs, kwargs = capture_inputs(model, ids(8, seed=1), 8, torch.device("cpu"))
    layer = model.model.layers[0]
    qmods = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
    experts = quantized_experts(layer)
    norm = layer.post_attention_layernorm.weight.clone()
    with quantizers_off(qmods), experts_off(experts):
        want = run_block(layer, inputs, kwargs)
        groups = block_groups(layer)
        collect(layer, groups, inputs, kwargs, want_h=True)
        routed = capture_routed(layer, list(experts), inputs, kwargs)
        changed = []
        for g in groups:
            g.routed = {n: routed[n] for n in g.experts}
            specs = {n: spec.weight for n in g.names if n in qmods}
            specs.update({f"{n}.{p}": spec.weight for n in g.experts for p in ("gate_up_proj", "down_proj")})
            changed += part.apply(layer, g, specs)
        got = run_block(layer, inputs, kwargs)
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(changed) or family == "gpt_oss"
    assert "mlp.experts.gate_up_proj" in changed
    assert not torch.allclose(layer.post_attention_layernorm.weight, norm)  # something was folded
    for w, g in zip(want, got):
        assert float((g - w).abs().max()) < 1e-5 * float(w.abs().max())


@pytest.mark.parametrize("method", ("awq", "smoothquant+rtn"))
def test_folds_that_would_change_the_layer_are_refused(method):
    """A second norm in the MLP's path (as some MoE families have) does not commute with a folded scale: the probe on
    a copy of the layer refuses in one line instead of a broken model."""
    fp = tiny_moe("qwen3_moe")
    for layer in fp.model.layers:
        layer.mlp.register_forward_pre_hook(lambda m, a: (a[0] * torch.rsqrt(a[0].pow(2).mean(-1, keepdim=True)),))
    cfg = PTQConfig(method=method, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"folding scales into Qwen3MoeDecoderLayer's norms and linears changes what "
                                         r"it computes \(relative change .*\), so its MoE layout .*; use gptq, rtn"):
        run_ptq(copy.deepcopy(fp), parse("w8a8"), cfg, ids(2, seed=1))


@pytest.mark.parametrize("family", ("qwen3_moe", "gpt_oss", "nemotron_h"))
def test_down_inputs_are_what_each_expert_computes(family):
    """The down projection's inputs GPTQ's Hessian and AWQ/SmoothQuant's statistics come from, through the default
    gate ([gate; up] rows), gpt-oss's own (interleaved, clamped) and an ungated expert (nemotron_h: relu^2(up))."""
    model = build_tiny(family)[0] if family == "nemotron_h" else tiny_moe(family)
    quantize_model(model, parse("w4"))
    name, mod = next(iter(quantized_experts(model).items()))
    lay = mod.expert_layout
    assert lay.gated == (family != "nemotron_h")
    w = {p: mod.canonical(p).detach() for p in lay.params}
    x = torch.randn(10, w[lay.up].shape[-1], generator=torch.Generator().manual_seed(0))
    for e in range(lay.num_experts):
        bias = mod.down_proj_bias[e] if lay.bias else None
        got = torch.nn.functional.linear(down_inputs(mod, x, e, w[lay.up], quantize=False), w[lay.down][e], bias)
        want = expert_loop(mod, x, torch.full((10, 1), e), torch.ones(10, 1), w)
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (name, e)

"""Fake-quant fused MoE experts (qat/experts.py): forward and gradients against a float64 loop over experts with
per-expert quantized weights, idle experts, overrides and excludes that name experts, the refusals."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import transformers as tf
from helpers import HAVE_TRITON
from helpers.quant_ref import ref_codes, ref_dequant, ref_minmax, ref_weight_rows
from torch import nn

from qat.apply import quantize_model
from qat.coverage import CoverageError, measure
from qat.experts import QuantExperts, routing_load
from qat.spec import QuantSpec, TensorSpec, parse

SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**SMALL, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                num_experts_per_tok=2)
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(**SMALL, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                              layer_types=["sliding_attention", "full_attention"])
    else:
        raise ValueError(family)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def ref_fake_quant_w(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """float64 symmetric minmax fake quant of one expert's (out, in) weight, per channel or per group, on the
    weights' default grid (signed: no row's extreme sits on a rounding tie)."""
    gran = "group" if group else "channel"
    rows = ref_weight_rows(w, gran, group)
    s, _ = ref_minmax(rows, bits, True, "signed")
    return ref_dequant(ref_codes(rows, s, None, bits, True), s, None).reshape(w.shape)


def ref_fake_quant_a(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float64 asymmetric per-token minmax fake quant (the a8 default)."""
    s, z = ref_minmax(x, bits, False)
    return ref_dequant(ref_codes(x, s, z, bits, False), s, z)


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def ref_experts(module, x, index, routing, w_up, w_down, bits, group, act_bits):
    """The experts' output, token by token and slot by slot, from float64 (E, out, in) weights."""
    lay = module.expert_layout
    assert all(q.spec.sym_range == "signed" for q in module.weight_quantizers.values())
    wq_up = torch.stack([ste(w, ref_fake_quant_w(w, bits, group)) for w in w_up])
    wq_down = torch.stack([ste(w, ref_fake_quant_w(w, bits, group)) for w in w_down])
    out = []
    for t in range(x.shape[0]):
        xt = x[t : t + 1]
        if act_bits:
            xt = ste(xt, ref_fake_quant_a(xt, act_bits))
        acc = torch.zeros_like(xt)
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            h = xt @ wq_up[e].T + (module.gate_up_proj_bias[e] if lay.bias else 0)
            h = module._apply_gate(h)
            if act_bits:
                h = ste(h, ref_fake_quant_a(h, act_bits))
            h = h @ wq_down[e].T + (module.down_proj_bias[e] if lay.bias else 0)
            acc = acc + h * routing[t, slot]
        out.append(acc)
    return torch.cat(out)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("scheme,bits,group,act_bits", [("w4", 4, None, 0), ("w4g16a8", 4, 16, 8)])
def test_forward_and_gradients_equal_a_float64_loop_over_experts(family, scheme, bits, group, act_bits):
    model = tiny(family).double()
    quantize_model(model, scheme)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts)
    gen = torch.Generator().manual_seed(1)
    n, e = 24, experts.expert_layout.num_experts
    x = torch.randn(n, 64, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.stack([torch.randperm(e, generator=gen)[:2] for _ in range(n)])
    routing = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    out = experts(x, index, routing)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(out, [x, experts.gate_up_proj, experts.down_proj], g)

    w_up = experts.canonical("gate_up_proj").detach().clone().requires_grad_(True)
    w_down = experts.canonical("down_proj").detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = ref_experts(experts, x_ref, index, routing, w_up, w_down, bits, group, act_bits)
    ref_grads = torch.autograd.grad(ref, [x_ref, w_up, w_down], g)
    # the scales are fp32 (what export stores), the reference's float64: equal to ~1e-7 of the tensor's scale
    assert float((out - ref).detach().abs().max()) <= 1e-6 * float(ref.detach().abs().max())
    t = (lambda w: w.transpose(1, 2)) if experts.expert_layout.transposed else (lambda w: w)
    for got, want in zip(grads, (ref_grads[0], t(ref_grads[1]), t(ref_grads[2]))):
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
    # the quantized weights really are on a 4-bit grid per expert row: 16 levels at most per row (or group)
    wq = experts.quantized_weight("down_proj")
    rows = wq.reshape(-1, group or wq.shape[-1])
    assert max(len(torch.unique(r)) for r in rows) <= 16


def test_an_expert_without_tokens_gets_zero_gradient_and_no_nan():
    model = tiny("qwen3_moe")
    quantize_model(model, "w4a8")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(10, 64, requires_grad=True)
    index = torch.tensor([[0, 1]] * 10)  # experts 2 and 3 idle
    out = experts(x, index, torch.full((10, 2), 0.5))
    out.square().sum().backward()
    g = experts.gate_up_proj.grad
    assert torch.isfinite(g).all() and torch.isfinite(x.grad).all()
    assert g[2:].abs().sum() == 0 and experts.down_proj.grad[2:].abs().sum() == 0
    assert g[:2].abs().sum() > 0
    assert routing_load(model)["model.layers.0.mlp.experts"] == [10, 10, 0, 0]
    assert routing_load(model)["model.layers.0.mlp.experts"] == [0, 0, 0, 0]  # reset after reading


def test_lsq_learns_one_scale_per_expert_row_and_trains():
    model = tiny("qwen3_moe")
    quantize_model(model, QuantSpec(weight=TensorSpec(bits=4, learnable="lsq")))
    experts = model.model.layers[0].mlp.experts
    q = experts.weight_quantizers["gate_up_proj"]
    assert q.scale.shape == (4 * 64, 1)  # 4 experts x 64 rows (2 x 32 intermediate)
    ids = torch.randint(0, 128, (2, 16))
    model(ids).logits.square().mean().backward()
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all() and q.scale.grad.abs().sum() > 0


def test_overrides_and_excludes_name_expert_parameters():
    model = tiny("qwen3_moe")
    report = quantize_model(model, "w4", overrides={"*.experts.down_proj": "w8"})
    experts = model.model.layers[1].mlp.experts
    assert experts.weight_quantizers["down_proj"].spec.bits == 8
    assert experts.weight_quantizers["gate_up_proj"].spec.bits == 4
    assert report.coverage.share == 1.0

    model = tiny("qwen3_moe")
    report = quantize_model(model, "w4", exclude=["lm_head", "*.experts.down_proj"])
    experts = model.model.layers[0].mlp.experts
    assert experts.quantized_params() == ["gate_up_proj"]
    q, total = report.coverage.kinds["experts"]
    assert q * 3 == total * 2  # gate_up (2I x H) quantized, down (H x I) on purpose not: 2/3 of the elements
    assert "model.layers.0.mlp.experts.down_proj" in report.coverage.full_precision


def test_coverage_counts_every_decoder_weight_and_sets_routers_apart():
    model = tiny("qwen3_moe")
    before = measure(model)
    assert before.share == 0.0
    report = quantize_model(model, "w4")
    cov = report.coverage
    decoder = sum(p.numel() for n, p in model.model.layers.named_parameters()
                  if p.dim() >= 2 and not n.endswith("gate.weight"))
    assert cov.total == decoder and cov.quantized == decoder
    assert cov.apart["router"] == 2 * 4 * 64
    assert set(cov.to_dict()["kinds"]) == {"attention", "experts"}
    assert "coverage: 100.00%" in str(report)


class OddExperts(nn.Module):
    """Fused experts in a layout nobody declared: three stacked tensors w1/w2/w3."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 32, 64))
        self.w2 = nn.Parameter(torch.randn(4, 64, 32))
        self.w3 = nn.Parameter(torch.randn(4, 32, 64))


def test_an_unknown_fused_layout_is_refused_in_one_line_unless_excluded():
    model = tiny("qwen3_moe")
    model.model.layers[0].mlp.experts = OddExperts()
    with pytest.raises(CoverageError) as err:
        quantize_model(model, "w4")
    msg = str(err.value)
    assert "\n" not in msg and "model.layers.0.mlp.experts.w1" in msg and "quant.exclude=" in msg
    report = quantize_model(tiny("qwen3_moe"), "w4")
    assert report.coverage.share == 1.0
    model = tiny("qwen3_moe")
    model.model.layers[0].mlp.experts = OddExperts()
    report = quantize_model(model, "w4", exclude=["lm_head", "model.layers.0.mlp.experts"])
    assert 0.5 < report.coverage.share < 1.0


def test_a_module_that_computes_differently_is_refused():
    model = tiny("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    own = type(experts).forward
    experts.forward = lambda h, i, w: 2 * own(experts, h, i, w)  # not what its layout flags describe
    with pytest.raises(CoverageError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: .*computes something"):
        quantize_model(model, "w4")


def test_a_linear_router_stays_full_precision_unless_asked():
    torch.manual_seed(0)
    cfg = tf.Qwen2MoeConfig(**SMALL, intermediate_size=96, moe_intermediate_size=32,
                            shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2)
    model = tf.AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).eval()
    report = quantize_model(model, "w4")
    assert "model.layers.0.mlp.shared_expert_gate" in report.skipped
    assert report.coverage.kinds["shared_experts"][0] == report.coverage.kinds["shared_experts"][1] > 0
    # the experts' router here is a bare parameter, which quant.routers=true cannot quantize: said, not skipped
    with pytest.raises(CoverageError, match=r"mlp\.gate\.weight: quant\.routers=true"):
        quantize_model(tf.AutoModelForCausalLM.from_config(cfg).eval(), replace(parse("w4"), routers=True))


def test_the_quantized_model_keeps_its_state_dict_keys():
    model = tiny("gpt_oss")
    keys = set(model.state_dict())
    quantize_model(model, "w4g16")
    assert keys <= set(model.state_dict())
    experts = model.model.layers[0].mlp.experts
    assert experts.unwrap().__class__.__name__ == "GptOssExperts"


# The stacked experts through the fused fake-quant kernel on its device path: a GPU, or CPU tensors in the lane.
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda, id="gpu"),
                                    pytest.param("cpu", marks=pytest.mark.lane, id="lane")])
def test_experts_through_the_fused_kernel_match_the_reference(device, kernel_calls, monkeypatch):
    import qat.quantizers
    from qat.device import device_path

    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    model = tiny("qwen3_moe").to(device, torch.bfloat16)
    quantize_model(model, "w4g16a8")
    experts = model.model.layers[0].mlp.experts
    x0 = torch.randn(12, 64, device=device, dtype=torch.bfloat16)
    if not device_path(x0, "fake_quant"):
        pytest.skip("the kernel's device path is off here (CPU outside the lane)")
    index = torch.tensor([[e % 4, (e + 1) % 4] for e in range(12)], device=device)
    routing = torch.full((12, 2), 0.5, device=device, dtype=torch.bfloat16)

    def run():
        experts.zero_grad()
        x = x0.clone().requires_grad_(True)
        y = experts(x, index, routing)
        y.float().square().sum().backward()
        return y.detach(), x.grad, experts.gate_up_proj.grad, experts.down_proj.grad

    fused = run()
    assert kernel_calls["fake_quant"] >= 4  # both stacked weights and both routed inputs went through the kernel
    monkeypatch.setattr(qat.quantizers, "fused_fake_quant_rows", lambda *a: None)  # the reference path
    calls = kernel_calls["fake_quant"]
    ref = run()
    assert kernel_calls["fake_quant"] == calls
    for name, a, b in zip(("output", "input grad", "gate_up grad", "down grad"), fused, ref):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_a_saved_fake_quant_moe_folder_loads_back_to_the_same_logits(family, tmp_path):
    """transformers saves Qwen3-MoE's experts under per-expert names and our quantizers under the fused module's:
    both come back together (learned LSQ scales included)."""
    from qat.load import load

    model = tiny(family)
    quantize_model(model, QuantSpec(weight=TensorSpec(bits=4, learnable="lsq"), activation=parse("w4a8").activation))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.mul_(1 + 0.3 * torch.rand_like(p))  # learned scales, not the ones a fresh quantize_model gives
    ids = torch.randint(0, 128, (2, 10))
    ref = model(ids).logits.detach()
    model.save_pretrained(tmp_path)
    back = load(tmp_path, "float32", attn_implementation=model.config._attn_implementation)
    assert isinstance(back.model.layers[0].mlp.experts, QuantExperts)
    assert torch.equal(back(ids).logits, ref)


def test_a_mixtral_folder_saved_under_its_checkpoint_names_loads_its_quantizers(tmp_path):
    """transformers saves Mixtral's `mlp` as `block_sparse_moe`, quantizer tensors included: found all the same."""
    from qat.load import load

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(**SMALL, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    quantize_model(model, QuantSpec(weight=TensorSpec(bits=4, learnable="lsq")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.mul_(1 + 0.3 * torch.rand_like(p))
    ids = torch.randint(0, 128, (2, 10))
    ref = model(ids).logits.detach()
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.weight_quantizers.gate_up_proj.scale" in f.keys()
    back = load(tmp_path, "float32", attn_implementation=model.config._attn_implementation)
    assert torch.equal(back(ids).logits, ref)


def test_the_routing_load_counts_each_token_once_under_gradient_checkpointing():
    model = tiny("qwen3_moe").train()
    quantize_model(model, "w4")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 128, (2, 12))
    model(ids).logits.square().mean().backward()  # backward recomputes each layer's forward
    load = routing_load(model)
    assert set(load) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert all(sum(counts) == 2 * 12 * 2 for counts in load.values())  # tokens x top-2, not twice that

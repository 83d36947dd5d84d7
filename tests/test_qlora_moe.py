"""QLoRA on fused MoE experts: every expert packed, the packed forward against a float64 loop over the
dequantized weights, per-expert adapters through peft (only they train; an expert no token reaches gets a zero
gradient), saving and reloading them, and the merges (bf16, requant, QA-LoRA) computing what the adapters did,
on tiny Qwen3-MoE (gated, fused [gate; up]) and gpt-oss (transposed, interleaved, biases)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from peft import PeftModel

from qat.apply import quantize_model
from qat.coverage import CoverageError, measure
from qat.experts import QuantExperts, expert_loop, experts_modules
from qat.qlora.adapters import add_adapters, load_adapters, save_adapters
from qat.qlora.base import fingerprint, pack_model
from qat.qlora.config import LoRAConfig
from qat.qlora.expert_adapters import PackedLoraExperts
from qat.qlora.merge import merge_bf16, merge_qalora, merge_requant
from qat.runtime.packed import PackedLinear
from qat.runtime.packed_experts import PackedExperts, PackedExpertStack
from trainer.models import enable_checkpointing

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128)
FAMILIES = {
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                           num_experts_per_tok=2),
    "gpt_oss": lambda: tf.GptOssConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                       head_dim=16, layer_types=["sliding_attention", "full_attention"]),
}


def tiny(family, dtype=torch.float32):
    torch.manual_seed(0)
    # transformers' default grouped_mm experts run no float64, and QuantExperts.wrap checks itself against them
    impl = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    model = tf.AutoModelForCausalLM.from_config(FAMILIES[family](), **impl).to(dtype).eval()
    for name, p in model.named_parameters():  # a wider spread than the init's 0.02, so routing and adapters show
        if "experts" in name or name.endswith("router.weight") or name.endswith("gate.weight"):
            p.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model


def fake_and_packed(family, scheme="w4g16", dtype=torch.float32, double_quant=False):
    fq = tiny(family, dtype)
    quantize_model(fq, scheme)
    packed = copy.deepcopy(fq)
    pack_model(packed, double_quant)
    return fq, packed


def ids(n=2, t=16, seed=1):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def adapted(family, scheme="w4g16", dtype=torch.float32, std=0.05, **lora):
    _, packed = fake_and_packed(family, scheme, dtype)
    model = add_adapters(packed, LoRAConfig(**{"r": 2, "dropout": 0.0, "dtype": "float32", **lora}))
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_" in n:  # non-zero B, so the adapters change the output (fp64 adapters on an fp64 base)
            p.data = (torch.randn(p.shape, generator=g) * std).to(torch.float64 if dtype == torch.float64 else p.dtype)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_is_packed_and_the_rest_refused(family):
    fq, packed = fake_and_packed(family)
    cov = measure(fq)
    assert cov.kinds["experts"][0] == cov.kinds["experts"][1] > 0 and cov.share == 1.0
    assert not [n for n, p in packed.named_parameters() if p.dim() == 3]  # no fused fp expert weight left
    assert not experts_modules(packed)
    experts = [m for m in packed.modules() if isinstance(m, PackedExperts)]
    assert len(experts) == 2 and all(type(m).__name__.startswith("Packed") for m in experts)
    packed_elements = sum(m.out_features * m.in_features for m in packed.modules() if isinstance(m, PackedLinear))
    assert packed_elements == cov.quantized  # what quantize_model counted quantized, every element now codes
    assert not any(p.requires_grad for p in packed.parameters())

    for exclude, what in (("*.experts", "gate_up_proj"), ("*.experts.down_proj", "down_proj")):
        model = tiny(family)
        quantize_model(model, "w4g16", exclude=["lm_head", exclude])
        with pytest.raises(CoverageError, match=rf"layers\.0\.mlp\.experts\.{what} stays full precision.*exclude"):
            pack_model(model)
        assert not any(isinstance(m, PackedLinear) for m in model.modules())  # refused before anything changed


@pytest.mark.parametrize("scheme,double_quant", [("w4g16", False), ("w4g16asym", False), ("w8", False),
                                                 ("wnf4g16", True), ("w3g16asym", False)])
def test_each_expert_dequantizes_to_its_rows_of_the_stack(scheme, double_quant):
    _, packed = fake_and_packed("gpt_oss", scheme, torch.bfloat16, double_quant)
    stacks = [m for m in packed.modules() if isinstance(m, PackedExpertStack)]
    assert len(stacks) == 4 and (stacks[0].scale_codes is not None) == double_quant
    for s in stacks:
        whole = s.experts_weight(torch.float32)
        assert all(torch.equal(s.expert_weight(e, torch.float32), whole[e]) for e in range(s.num_experts))


@pytest.mark.lane
@pytest.mark.parametrize("scheme", ["w4g16", "w8g16asym"])
def test_experts_dequantize_through_the_runtime_kernel_on_the_device_path(scheme, kernel_calls, monkeypatch):
    """On a GPU (the Triton interpreter in the lane) each expert's weight comes from the integer runtime's
    dequantization kernel, bit for bit the torch path's, in forward and again in backward."""
    from qat.device import device_path

    _, packed = fake_and_packed("qwen3_moe", scheme, torch.bfloat16)
    stacks = [m for m in packed.modules() if isinstance(m, PackedExpertStack)]
    on_device = device_path(stacks[0].qweight, "int_linear")
    monkeypatch.setenv("DISTQAT_INT_KERNELS", "0")
    want = [s.expert_weight(e) for s in stacks for e in range(4)]
    monkeypatch.delenv("DISTQAT_INT_KERNELS")
    got = [s.expert_weight(e) for s in stacks for e in range(4)]
    assert kernel_calls["dequantize"] == (len(got) if on_device else 0)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    model = add_adapters(packed, LoRAConfig(r=2, dropout=0.0))
    experts = model.base_model.model.model.layers[0].mlp.experts
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    index = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0]])  # every expert hit
    before = kernel_calls["dequantize"]
    experts(x, index, torch.full((4, 2), 0.5, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    # 2 stacks x 4 experts, dequantized in forward and again in backward: nothing weight-sized kept
    assert kernel_calls["dequantize"] - before == (16 if on_device else 0)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_the_packed_forward_is_the_fake_quant_model_and_a_float64_loop(family):
    fq, packed = fake_and_packed(family)
    with torch.no_grad():
        assert torch.equal(packed(ids()).logits, fq(ids()).logits)  # the same codes x scales, the same matmuls
    _, packed = fake_and_packed(family, dtype=torch.float64)
    experts = packed.model.layers[1].mlp.experts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 64, generator=gen, dtype=torch.float64)
    index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(24)]).reshape(24, 2)
    index[5:9] = torch.tensor([4, 0])  # expert parallelism's sentinel (another rank's expert) is skipped
    routing = torch.rand(24, 2, generator=gen, dtype=torch.float64)
    weights = {p: s.experts_weight(torch.float64) for p, s in experts.stacks().items()}
    want = expert_loop(experts, x, index, routing, weights, layout=experts.expert_layout)
    with torch.no_grad():
        got = experts(x, index, routing)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_backward_saves_no_expert_weight():
    model = adapted("qwen3_moe")
    stacks = [s for s in model.modules() if isinstance(s, PackedExpertStack)]
    shapes = {(s.expert_out, s.in_features) for s in stacks} | {(s.out_features, s.in_features) for s in stacks}
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # 7 tokens: no activation shaped like a weight
        loss = model(ids(1, 7)).logits.pow(2).mean()
    loss.backward()
    assert saved and not [s for s in saved if s in shapes or s[::-1] in shapes or len(s) == 3 and s[1:] in shapes]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_attention_and_experts_trains_only_the_adapters(family):
    _, packed = fake_and_packed(family)
    model = add_adapters(packed, LoRAConfig(r=4, dropout=0.0))
    experts = [m for m in model.modules() if isinstance(m, PackedLoraExperts)]
    assert len(experts) == 4  # gate_up_proj and down_proj of both layers (peft's MoE target rewrite kept off)
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")} >= {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}
    buffers = {n: t.clone() for n, t in model.named_buffers() if t is not None}
    base_print = fingerprint(model.base_model.model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    x = ids()
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        assert all(m.lora_B["default"].grad.abs().sum() > 0 for m in experts)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(buffers[n], t) for n, t in model.named_buffers() if t is not None)
    assert fingerprint(model.base_model.model) == base_print


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_expert_gradients(reentrant):
    def grads(checkpointing):
        model = adapted("qwen3_moe")
        if checkpointing:
            enable_checkpointing(model.base_model.model, reentrant)
            model.enable_input_require_grads()
        model.train()
        model(ids()).logits.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and any("experts" in n for n in plain)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


def test_every_packed_layer_of_deepseek_v3_gets_its_own_rank_r_adapter():
    """peft rewrites the targets of DeepSeek-V3 (and Qwen3-MoE, OLMoE, Mixtral...) from transformers 4's per-expert
    linears: `gate_proj`/`up_proj`/`down_proj` targets would become 3-D parameter targets and `gate_up_proj` get
    rank 2r, leaving the dense layer and the shared experts without adapters. distqat's targets stay exact."""
    torch.manual_seed(0)
    cfg = tf.DeepseekV3Config(**{**COMMON, "num_hidden_layers": 3}, intermediate_size=96, moe_intermediate_size=32,
                              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                              kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                              n_group=1, topk_group=1)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    quantize_model(model, "w4g8")
    names = pack_model(model)
    peft_model = add_adapters(model, LoRAConfig(r=2, dropout=0.0))
    adapted = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert sorted(adapted) == sorted(names)
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.gate_proj"} <= adapted.keys()
    assert all(m.r["default"] == 2 for m in adapted.values())


def test_an_expert_without_tokens_gets_a_zero_gradient():
    model = adapted("gpt_oss")
    experts = model.base_model.model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 64, generator=gen, requires_grad=True)
    index = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(10)])  # expert 3 gets nothing
    routing = torch.rand(10, 2, generator=gen)
    experts(x, index, routing).pow(2).sum().backward()
    for lora in experts.stacks().values():
        for p in (lora.lora_A["default"], lora.lora_B["default"]):
            assert torch.isfinite(p.grad).all() and torch.equal(p.grad[3], torch.zeros_like(p.grad[3]))
            assert all(p.grad[e].abs().sum() > 0 for e in range(3))
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_expert_adapters_save_and_reload(tmp_path):
    model = adapted("qwen3_moe")
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    save_adapters(model, tmp_path / "a", {"fingerprint": fingerprint(model.base_model.model), "base": "tiny"})
    _, base = fake_and_packed("qwen3_moe")
    again = load_adapters(base, tmp_path / "a", fingerprint=fingerprint(base))
    assert len([m for m in again.modules() if isinstance(m, PackedLoraExperts)]) == 4
    with torch.no_grad():
        assert torch.equal(again(x).logits, want)
    # Plain peft too, its transformers-5 MoE target rewrite left out for a packed base (the experts keep adapters).
    plain = PeftModel.from_pretrained(fake_and_packed("qwen3_moe")[1], str(tmp_path / "a"))
    assert len([m for m in plain.modules() if isinstance(m, PackedLoraExperts)]) == 4
    with torch.no_grad():
        assert torch.equal(plain(x).logits, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_merge_computes_base_plus_each_experts_adapter(family):
    model = adapted(family)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
        with model.disable_adapter():
            base = model(x).logits
    assert (want - base).abs().max() > 1e-2  # the expert adapters matter
    merged = merge_bf16(model, torch.float32)
    assert not any(isinstance(m, (PackedLinear, PackedExperts)) for m in merged.modules())
    assert [n for n, p in merged.named_parameters() if p.dim() == 3]  # the model's own fused parameters again
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_qalora_merge_folds_each_expert_exactly_into_its_zero_points(family):
    model = adapted(family, "w4g16asym", torch.float64, variant="qalora")
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    merged = merge_qalora(model)
    stacks = [m for m in merged.modules() if isinstance(m, PackedExpertStack)]
    assert len(stacks) == 4 and all(s.offset is not None and s.offset.abs().max() > 0 for s in stacks)
    with torch.no_grad():
        got = merged(x).logits
    assert (got - want).abs().max() < 1e-10


@pytest.mark.parametrize("family", FAMILIES)
def test_requant_merge_gives_a_zero_adapter_back_and_keeps_a_real_one(family):
    model = adapted(family, "w8g16asym", std=0.0)
    base = {n.replace(".base_layer", ""): m.experts_weight(torch.float32) for n, m in model.named_modules()
            if isinstance(m, PackedExpertStack)}
    merged, report = merge_requant(model, "rtn")
    assert all(r["error"] == 0.0 for r in report) and len(report) == 12
    for name, w in base.items():
        parent, _, param = name.removeprefix("base_model.model.").rpartition(".")
        owner = merged.get_submodule(parent)
        assert isinstance(owner, QuantExperts) and torch.equal(owner.quantized_weight(param).detach(), w)

    model = adapted(family, "w8g16asym", std=0.02)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    merged, report = merge_requant(model, "rtn")
    assert all(0 < r["error"] < 0.01 for r in report if "experts" in r["name"])
    with torch.no_grad():
        got = merged(x).logits
    assert (got - want).abs().mean() < 0.1 * (want - want.mean()).abs().mean()


@pytest.mark.parametrize("method", ["gptq-grid", "gptq-keep"])
def test_grid_requant_rounds_experts_to_nearest_and_gives_a_zero_adapter_back(method):
    model = adapted(next(iter(FAMILIES)), "w8g16asym", std=0.0)
    base = {n.replace(".base_layer", ""): m.experts_weight(torch.float32) for n, m in model.named_modules()
            if isinstance(m, PackedExpertStack)}
    merged, report = merge_requant(model, method, calib_ids=ids(4, 16))
    assert all(r["error"] == 0.0 for r in report) and len(report) == 12
    # no per-expert Hessian in the grid re-roundings: expert stacks round to nearest, the linears by `method`
    assert {r["algorithm"] for r in report if "experts" in r["name"]} == {"rtn-grid"}
    assert {r["algorithm"] for r in report if "experts" not in r["name"]} == {method}
    for name, w in base.items():
        parent, _, param = name.removeprefix("base_model.model.").rpartition(".")
        owner = merged.get_submodule(parent)
        assert isinstance(owner, QuantExperts) and torch.equal(owner.quantized_weight(param).detach(), w)

"""Converting fake-quant MoE models: the integer experts reproduce the fake-quant model, the tensors carry the family's
original checkpoint names, vLLM's MoE rules (restated in helpers.readers) accept the config, transformers reads what
its expert decompression can, and what the format cannot hold is refused with the fix."""

import copy
import json
import re

import pytest
import torch
import transformers as tf
from helpers import LANE
from helpers.readers import vllm_moe_oracle
from safetensors.torch import load_file

from qat.apply import quantize_model
from qat.experts import QuantExperts
from qat.export import convert_model, load_quantized
from qat.export.format import FormatError
from qat.export.readers import vllm_moe_scheme
from qat.runtime.int_experts import IntExperts
from qat.runtime.pack import unpack_int32

C = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
         max_position_embeddings=128)
CONFIGS = {
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**C, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                           num_experts_per_tok=2),
    "mixtral": lambda: tf.MixtralConfig(**C, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**C, intermediate_size=96, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": lambda: tf.GptOssConfig(**C, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                       head_dim=16, layer_types=["sliding_attention", "full_attention"]),
    "deepseek_v3": lambda: tf.DeepseekV3Config(
        **{**C, "num_hidden_layers": 3}, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
}
# group sizes dividing every input width of the family (shared experts 48, DeepSeek's q_b_proj 24)
GROUP = {"qwen3_moe": "w4g32", "mixtral": "w4g32", "qwen2_moe": "w4g16", "gpt_oss": "w4g32", "deepseek_v3": "w4g8"}
# where vLLM's MoE layer sits (its module names follow the family's original checkpoints)
VLLM_PREFIX = {"mixtral": "model.layers.{}.block_sparse_moe.experts"}


def _model(family, scheme=None, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[family]()), dtype=dtype).eval()
    if scheme:
        quantize_model(model, scheme, **kw)
    return model


def _ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _experts(model, cls):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def _scheme(family, kind):
    return GROUP[family] if kind == "group" else kind


@pytest.mark.parametrize("kind", ["group", "w4", "w8a8", "fp8"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_converted_experts_compute_the_fake_quant_model(tmp_path, family, kind):
    model = _model(family, _scheme(family, kind))
    rt = load_quantized(convert_model(model, tmp_path / "int"))
    fq, ie = dict(_experts(model, QuantExperts)), dict(_experts(rt, IntExperts))
    assert set(fq) == set(ie) and fq
    for name, m in fq.items():
        for p in m.expert_layout.params:  # codes and scales bit for bit: the dequantized weights are identical
            assert torch.equal(ie[name].dequantized_weight(p, torch.float32), m.quantized_weight(p)), (name, p)
        x = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
        idx = torch.randint(0, 4, (10, 2), generator=torch.Generator().manual_seed(2))
        w = torch.rand(10, 2, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ref, got = m(x, idx, w), ie[name](x, idx, w)
        if kind in ("group", "w4"):
            assert torch.equal(ref, got), name  # the same dequantized weights through the same F.linear
        else:  # integer (or e4m3) products summed exactly, scales applied after: fp32 rounding apart
            assert (ref - got).abs().max() <= 1e-5 * ref.abs().max(), name
    with torch.no_grad():
        ref, got = model(_ids()).logits, rt(_ids()).logits
    if kind in ("group", "w4"):
        assert torch.equal(ref, got)
    else:  # fp32 rounding in earlier layers can move an int8/e4m3 activation code at a rounding tie
        assert (ref - got).abs().max() <= 5e-3 * ref.abs().max()


def test_stored_expert_codes_are_the_quantizers_own(tmp_path):
    model = _model("qwen3_moe", "w4g32asym")
    tensors = load_file(str(convert_model(model, tmp_path / "int") / "model.safetensors"))
    m = model.model.layers[1].mlp.experts
    w = m.canonical("gate_up_proj").detach()
    codes, scale, zero = m.weight_quantizers["gate_up_proj"].quantize(w.reshape(-1, 64))
    rows = codes.reshape(4, 64, 64)
    for e in range(4):
        for half, proj in enumerate(("gate_proj", "up_proj")):
            key = f"model.layers.1.mlp.experts.{e}.{proj}"
            got = unpack_int32(tensors[f"{key}.weight_packed"], 4, 64).long()
            assert torch.equal(got, rows[e, half * 32:(half + 1) * 32].long()), key
            s = scale.reshape(4, 64, -1)[e, half * 32:(half + 1) * 32]
            assert torch.equal(tensors[f"{key}.weight_scale"], s), key
            assert tensors[f"{key}.weight_shape"].tolist() == [32, 64]
            assert tensors[f"{key}.weight_zero_point"].dtype == torch.int32  # packed along the output dim


NAMES = {  # family -> (an expert entry of layer 1, the router's weight)
    "qwen3_moe": ("model.layers.1.mlp.experts.3.{}", ("gate_proj", "up_proj", "down_proj"), "mlp.gate"),
    "qwen2_moe": ("model.layers.1.mlp.experts.3.{}", ("gate_proj", "up_proj", "down_proj"), "mlp.gate"),
    "deepseek_v3": ("model.layers.1.mlp.experts.3.{}", ("gate_proj", "up_proj", "down_proj"), "mlp.gate"),
    "mixtral": ("model.layers.1.block_sparse_moe.experts.3.{}", ("w1", "w3", "w2"), "block_sparse_moe.gate"),
    "gpt_oss": ("model.layers.1.mlp.experts.3.{}", ("gate_up_proj", "down_proj"), "mlp.router"),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_expert_tensors_carry_the_familys_original_names(tmp_path, family):
    out = convert_model(_model(family, GROUP[family]), tmp_path / "int")
    keys = set(load_file(str(out / "model.safetensors")))
    pattern, projs, router = NAMES[family]
    for proj in projs:
        assert {f"{pattern.format(proj)}.{k}" for k in ("weight_packed", "weight_scale", "weight_shape")} <= keys
    assert f"model.layers.1.{router}.weight" in keys  # the router stays float, under the family's name
    cfg = json.loads((out / "config.json").read_text())
    record, ignore = cfg["distqat_export"]["experts"], cfg["quantization_config"]["ignore"]
    assert f"model.layers.1.{router}" in ignore
    if family == "gpt_oss":  # no mapping in transformers: the fused names, rows as the model holds them
        assert record == {"names": "fused", "family": "gpt_oss"}
        assert "model.layers.1.mlp.experts.gate_up_proj_bias" in keys  # biases stay float, stacked
        assert load_file(str(out / "model.safetensors"))[f"{pattern.format('gate_up_proj')}.weight_shape"].tolist() \
            == [64, 64]
    else:
        assert record["names"] == "original"
        assert not [k for k in keys if re.search(r"\.experts\.(gate_up_proj|down_proj)", k)]  # no stacked tensor
        assert not [k for k in keys if ".mlp." in k and family == "mixtral"]  # Mixtral keeps block_sparse_moe


VLLM = {"group": "WNA16MoE", "w4": "WNA16MoE", "w8a8": "W8A8Int8MoE", "fp8": "W8A8Fp8MoE"}


@pytest.mark.parametrize("kind", sorted(VLLM))
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_vllm_moe_rules_accept_the_converted_config(tmp_path, family, kind, capsys):
    from compressed_tensors.quantization import QuantizationConfig

    out = convert_model(_model(family, _scheme(family, kind)), tmp_path / "int")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(q)
    first = 1 if family == "deepseek_v3" else 0
    for layer in range(first, 3 if family == "deepseek_v3" else 2):
        prefix = VLLM_PREFIX.get(family, "model.layers.{}.mlp.experts").format(layer)
        assert vllm_moe_oracle(q, prefix) == VLLM[kind], (prefix, q["config_groups"])
    for g in q["config_groups"].values():
        if any("experts" in t for t in g["targets"]):
            assert vllm_moe_scheme(g, g["format"])[0] == VLLM[kind]  # what convert tells the user agrees
    err = capsys.readouterr().err
    assert "vLLM: runs it" in err and f"expert projections as {VLLM[kind]}" in err


def test_vllm_refuses_experts_whose_projections_differ(tmp_path, capsys):
    model = _model("qwen3_moe", "w4g32", overrides={"*.experts.down_proj": "w8"})
    q = json.loads((convert_model(model, tmp_path / "int") / "config.json").read_text())["quantization_config"]
    assert vllm_moe_oracle(q, "model.layers.0.mlp.experts") is None
    assert "mixes schemes across its expert projections" in capsys.readouterr().err
    with torch.no_grad():  # distqat runs it all the same
        assert torch.equal(model(_ids()).logits, load_quantized(tmp_path / "int")(_ids()).logits)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_transformers_reads_packed_and_fp8_experts_and_refuses_the_rest(tmp_path, family, capsys):
    pytest.importorskip("compressed_tensors")
    for scheme in ("w4", "fp8", "w8a8"):
        model = _model(family, scheme)
        out = convert_model(model, tmp_path / scheme)
        notes = capsys.readouterr().err
        if scheme == "w8a8":
            assert "from_pretrained fails on these experts" in notes
            with pytest.raises(Exception, match="(?i)conversion"):
                tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            continue
        hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            if scheme == "fp8":  # transformers quantizes no expert activation: the trained model less that
                assert "activations not quantized" in notes
                for _, m in _experts(model, QuantExperts):
                    m.input_quantizers = torch.nn.ModuleDict()
            # what transformers dequantizes is the trained grid, bit for bit
            for name, m in _experts(model, QuantExperts):
                for param in m.quantized_params():
                    read = getattr(hf.get_submodule(name), param)
                    read = read.transpose(1, 2) if m.expert_layout.transposed else read
                    assert torch.equal(read, m.quantized_weight(param)), (name, param)
            # transformers' own expert forward sums in another order than ours (and its kernel choice varies by CPU)
            torch.testing.assert_close(hf(_ids()).logits, model(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_experts_quantized_in_part_are_refused_with_the_fix(tmp_path):
    model = _model("mixtral", "w4g32", exclude=["lm_head", "*.experts.down_proj"])
    with pytest.raises(FormatError, match=r"experts\.down_proj: its other expert projection is quantized.*"
                                          r"quantize .*down_proj too, or exclude .*experts entirely"):
        convert_model(model, tmp_path / "int")
    assert not (tmp_path / "int").exists()


def test_full_precision_experts_are_written_per_expert_and_load_back(tmp_path):
    model = _model("qwen3_moe", "w4g32", exclude=["lm_head", "*.experts"])
    assert not _experts(model, QuantExperts)
    out = convert_model(model, tmp_path / "int")
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.mlp.experts.2.up_proj.weight"].shape == (32, 64)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.0.mlp.experts.2.up_proj" in ignore
    rt = load_quantized(out)
    assert not _experts(rt, IntExperts)
    with torch.no_grad():
        assert torch.equal(rt(_ids()).logits, model(_ids()).logits)


def test_a_converted_moe_model_converts_again_to_the_same_files(tmp_path):
    model = _model("mixtral", "w4g32asym", dtype=torch.bfloat16)
    rt = load_quantized(convert_model(model, tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(rt(_ids()).logits, model(_ids()).logits)  # bf16, weight-only: bit for bit
    convert_model(rt, tmp_path / "b")
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.lane
@pytest.mark.parametrize("scheme", ["w4g32", "w8a8"])
def test_integer_experts_run_the_int_kernels_on_the_device_path(tmp_path, scheme, kernel_calls):
    model = _model("qwen3_moe", scheme, dtype=torch.bfloat16)
    rt = load_quantized(convert_model(model, tmp_path / "int"), device="cuda" if torch.cuda.is_available() else None)
    name, ie = _experts(rt, IntExperts)[0]
    dev = ie.gate_up_proj_scale.device
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    idx = torch.randint(0, 4, (16, 2), generator=torch.Generator().manual_seed(2))
    w = torch.rand(16, 2, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    kernel_calls.clear()
    with torch.no_grad():
        ref = model.get_submodule(name)(x, idx, w).float()
        fp32 = _model("qwen3_moe", scheme).get_submodule(name)(x.float(), idx, w.float())
        got = ie(x.to(dev), idx.to(dev), w.to(dev)).float().cpu()
    # Exact integer sums (or fp32 kernels) against a bf16 matmul: the gap is bf16 rounding, as large as bf16-vs-fp32.
    assert (got - ref).abs().max() <= 2 * (ref - fp32).abs().max() + 1e-3 * ref.abs().max()
    assert sum(kernel_calls.values()) > 0 if (LANE or torch.cuda.is_available()) else not kernel_calls


@pytest.mark.parametrize("kind", ["group", "w8a8"])
def test_a_folder_converted_in_fp32_loads_in_bf16(tmp_path, kind):
    """The stacks take the dtype the model loads in (a scale rounded to bf16, as a bf16 conversion stores it)."""
    model = _model("qwen3_moe", _scheme("qwen3_moe", kind))
    rt = load_quantized(convert_model(model, tmp_path / "int"), dtype=torch.bfloat16)
    (name, ie), = _experts(rt, IntExperts)[:1]
    assert ie.gate_up_proj_scale.dtype == torch.bfloat16
    fq = dict(_experts(model, QuantExperts))[name]
    scale = fq.weight_quantizers["gate_up_proj"].qparams(fq.canonical("gate_up_proj").reshape(-1, 64))[0]
    assert torch.equal(ie.gate_up_proj_scale.float().reshape(-1), scale.to(torch.bfloat16).float().reshape(-1))
    with torch.no_grad():
        ref, got = model(_ids()).logits, rt(_ids()).logits.float()
    assert torch.isfinite(got).all() and (ref - got).abs().max() <= 5e-2 * ref.abs().max()

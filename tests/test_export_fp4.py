"""FP4 (NVFP4, MXFP4) and int W4A4 checkpoints end to end: convert writes compressed-tensors' nvfp4/mxfp4-pack-quantized
layouts with the fake-quant model's own codes and block scales, compressed-tensors' decompressor and transformers give
back the fake-quant weights bit for bit, the runtime reproduces the fake-quant logits exactly, the config groups are
compressed-tensors' own NVFP4 / MXFP4 presets (what vLLM's FP4 predicates test), NVFP4 siblings vLLM fuses share one
global scale, and the int w4a4kv4 scheme converts and loads."""

import copy
import json

import pytest
import torch
import transformers as tf
from compressed_tensors.compressors import MXFP4PackedCompressor, NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import MXFP4, MXFP4A16, NVFP4, NVFP4A16
from helpers.models import tiny_config
from helpers.moe import tiny_moe
from helpers.readers import compressed_tensors_weights, vllm_oracle
from safetensors.torch import load_file

from qat.apply import quantize_model
from qat.export import convert_model, load_quantized
from qat.export.format import FormatError
from qat.export.fp4 import share_globals
from qat.export.readers import vllm_scheme
from qat.fp4 import fp4_values
from qat.linear import QuantLinear
from qat.runtime.fp4 import Fp4Linear, pack_fp4, unpack_fp4
from qat.runtime.int_linear import IntLinear

N_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)
PRESETS = {"nvfp4": NVFP4, "wnvfp4": NVFP4A16, "mxfp4": MXFP4, "wmxfp4": MXFP4A16}
COMPRESSOR = {"nvfp4": NVFP4PackedCompressor, "mxfp4": MXFP4PackedCompressor}


def _quantized(scheme, dtype, seed=0, init=0.1):
    _, cfg = tiny_config("llama")
    cfg.intermediate_size, cfg.initializer_range = 128, init
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=dtype).eval()
    quantize_model(model, scheme)
    return model


def _ids():
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def _fmt(scheme):
    return scheme.lstrip("w")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4", "wnvfp4", "wmxfp4"])
def test_fp4_convert_decompresses_to_the_fake_quant_weights_and_runs_the_fake_quant_logits(tmp_path, scheme, dtype):
    fmt = _fmt(scheme)
    model = _quantized(scheme, dtype)
    out = convert_model(model, tmp_path / "fp4")
    tensors = load_file(str(out / "model.safetensors"))
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(q)
    (group,) = q["config_groups"].values()
    assert q["format"] == group["format"] == f"{fmt}-pack-quantized"
    # the group is compressed-tensors' own preset, which is what vLLM's FP4 predicates test
    preset = QuantizationScheme(targets=["Linear"], **PRESETS[scheme]).model_dump(mode="json")
    for kind in ("weights", "input_activations"):
        if preset[kind] is None:
            assert group[kind] is None
            continue
        for key in ("num_bits", "type", "symmetric", "group_size", "strategy", "dynamic", "scale_dtype"):
            assert group[kind][key] == preset[kind][key], (kind, key)
    rt = load_quantized(out)
    dense = compressed_tensors_weights(out)  # compressed-tensors' registry decompressor, as transformers runs it
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        fq = mod.quantized_weight()
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (mod.out_features, mod.in_features // 2)
        assert scale.dtype == (torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8)
        assert (f"{name}.weight_global_scale" in tensors) == (fmt == "nvfp4")
        # compressed-tensors unpacks to bf16: e2m1 x e4m3 (or x 2^e) has at most 6 significant bits, exact in bf16
        # and in fp32, so its weight equals the fake-quant one whatever the model dtype
        assert dense[name].dtype == torch.bfloat16 and torch.equal(dense[name].float(), fq.float()), name
        layer = rt.get_submodule(name)
        assert isinstance(layer, Fp4Linear)
        assert torch.equal(layer.dequantized_weight(dtype), fq)
        n += 1
    assert n == N_LINEARS
    with torch.no_grad():  # the same input quantizer and the same matmul on the same weights: equal, not close
        assert torch.equal(rt(_ids()).logits, model(_ids()).logits)
    # converting the loaded runtime model again writes the same tensors
    again = load_file(str(convert_model(rt, tmp_path / "again") / "model.safetensors"))
    assert again.keys() == tensors.keys()
    assert all(torch.equal(again[k].view(torch.uint8), tensors[k].view(torch.uint8)) if again[k].dtype.itemsize == 1
               else torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("scheme,expected", [("nvfp4", "W4A4Fp4"), ("wnvfp4", "W4A16Fp4"), ("mxfp4", "W4A4MxFp4"),
                                             ("wmxfp4", "W4A16Mxfp4")])
def test_fp4_reader_notes_name_vllms_scheme(tmp_path, capsys, scheme, expected):
    out = convert_model(_quantized(scheme, torch.bfloat16), tmp_path / "fp4")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    assert vllm_scheme(group, q["format"])[0] == expected
    assert f"vLLM: runs it: 14 layers as {expected}" in capsys.readouterr().err
    assert "fp4 weights" in (out / "README.md").read_text()


@pytest.mark.parametrize("scheme", ["mxfp4", "wnvfp4"])
def test_transformers_loads_the_folder_with_our_weights(tmp_path, scheme):
    from transformers import CompressedTensorsConfig

    model = _quantized(scheme, torch.bfloat16)
    out = convert_model(model, tmp_path / "fp4")
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        # bf16: weights decompressed exactly; MXFP4 activations are quantized by compressed-tensors' own e8m0 rule,
        # which qat.fp4 follows, so the logits are the fake-quant model's bit for bit
        assert torch.equal(hf(_ids()).logits, model(_ids()).logits)
    dq = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True))
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(dq.get_submodule(name).weight.float(), mod.quantized_weight().float()), name


def test_nvfp4_siblings_vllm_fuses_get_one_global_scale_without_moving_a_weight(tmp_path):
    model = _quantized("nvfp4", torch.float32)
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        attn.k_proj.weight.mul_(8.0)  # k's own global scale is 2^3 below q's and v's
    fq = {n: m.quantized_weight() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out = convert_model(model, tmp_path / "fp4")
    t = load_file(str(out / "model.safetensors"))
    p = "model.layers.0.self_attn"
    g = [float(t[f"{p}.{c}.weight_global_scale"]) for c in ("q_proj", "k_proj", "v_proj")]
    assert g[0] == g[1] == g[2]
    rt = load_quantized(out)
    assert all(torch.equal(rt.get_submodule(n).dequantized_weight(), w) for n, w in fq.items())


def test_share_globals_leaves_siblings_whose_scales_would_leave_e4m3():
    s_q = torch.full((4, 1), 1.875 * 2**-5).to(torch.float8_e4m3fn)  # / 2^6 under k's global: below e4m3's 2^-9
    t = {"a.q_proj.weight_scale": s_q, "a.q_proj.weight_global_scale": torch.tensor([2.0**10]),
         "a.k_proj.weight_scale": torch.full((4, 1), 448.0).to(torch.float8_e4m3fn),
         "a.k_proj.weight_global_scale": torch.tensor([2.0**4]),
         "a.v_proj.weight_scale": torch.full((4, 1), 1.0).to(torch.float8_e4m3fn),
         "a.v_proj.weight_global_scale": torch.tensor([2.0**10])}
    assert share_globals(t, ["a.q_proj", "a.k_proj", "a.v_proj"]) == ["a.{q_proj,k_proj,v_proj}"]
    assert float(t["a.q_proj.weight_global_scale"]) == 2.0**10  # left as written
    t["a.q_proj.weight_scale"] = torch.full((4, 1), 2.0).to(torch.float8_e4m3fn)  # 2 / 2^6 is an e4m3 value
    assert share_globals(t, ["a.q_proj", "a.k_proj", "a.v_proj"]) == []
    assert float(t["a.v_proj.weight_global_scale"]) == 2.0**4 and float(t["a.v_proj.weight_scale"][0]) == 2.0**-6


def test_fp4_nibbles_are_compressed_tensors_order_and_values():
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    codes = torch.arange(16, dtype=torch.int32).repeat(3, 2)  # every code, both nibble positions
    packed = pack_fp4(codes)
    assert torch.equal(unpack_fp4(packed), codes)
    ours = fp4_values(codes)
    assert torch.equal(unpack_fp4_from_uint8(packed, 3, 32, dtype=torch.float32), ours)
    assert ours[0, :8].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] and bool((ours[0, 9:16] < 0).all())


def test_int_w4a4kv4_converts_and_runs_the_fake_quant_logits(tmp_path, capsys):
    model = _quantized("w4a4kv4", torch.float32)
    out = convert_model(model, tmp_path / "w4a4")
    q = json.loads((out / "config.json").read_text())
    (group,) = q["quantization_config"]["config_groups"].values()
    assert group["format"] == "int-quantized" and group["input_activations"]["num_bits"] == 4
    assert q["distqat_export"]["version"] == 3 and q["distqat_export"]["kv"]["bits"] == 4
    assert vllm_scheme(group, group["format"])[0] is None is vllm_oracle(group, group["format"])
    assert "vLLM: cannot load it" in capsys.readouterr().err
    rt = load_quantized(out)
    layer = rt.model.layers[0].mlp.down_proj
    assert isinstance(layer, IntLinear) and layer.input_quantizer is not None
    dense = compressed_tensors_weights(out)
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(dense[name].float(), mod.quantized_weight()), name
    with torch.no_grad():
        assert torch.equal(rt(_ids()).logits, model(_ids()).logits)


def test_fp4_with_other_activations_is_refused_by_name(tmp_path):
    from qat.spec import QuantSpec, parse

    spec = QuantSpec(weight=parse("wnvfp4").weight, activation=parse("mxfp4").activation)
    with pytest.raises(FormatError, match="nvfp4 weights with mxfp4 dynamic activations"):
        convert_model(_quantized(spec, torch.float32), tmp_path / "bad")


@pytest.mark.parametrize("scheme,match", [("nvfp4", "nvfp4 experts have no converted layout"),
                                          ("w4a4kv4", "int4 activations of experts have no runtime")])
def test_fp4_and_a4_experts_are_refused_naming_the_way_out(tmp_path, scheme, match):
    model = tiny_moe("qwen3_moe")
    quantize_model(model, scheme)
    with pytest.raises(FormatError, match=match) as e:
        convert_model(model, tmp_path / "moe")
    assert "quant.overrides" in str(e.value)
    assert not (tmp_path / "moe").exists()

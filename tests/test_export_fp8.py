"""FP8 (W8A8 e4m3) checkpoints end to end: convert writes the compressed-tensors float-quantized layout with the
fake-quant model's own e4m3 weights, the runtime reproduces the fake-quant model, tampered files are refused,
vLLM's fp8 rule and compressed-tensors' decompressor accept the folder, transformers loads it, PTQ (rtn,
smoothquant+rtn) at fp8 writes folders that convert, and unsupported fp8 variants are refused by name."""

import copy
import json

import pytest
import torch
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher, tiny_config
from helpers.readers import compressed_tensors_weights, hf_and_fake_quant_logits, vllm_oracle

from qat.apply import quantize_model
from qat.export import convert_folder, convert_model, load_quantized
from qat.export.format import FormatError
from qat.export.readers import vllm_scheme
from qat.linear import QuantLinear
from qat.load import load
from qat.quantizers import fake_quant
from qat.runtime.fp8 import FP8, Fp8Linear, linear_fp8, quantize_act_fp8, scaled_mm_supported
from qat.spec import QuantSpec, TensorSpec, parse

N_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)


def _config():
    _, cfg = tiny_config("llama")
    cfg.intermediate_size = 128
    return cfg


def _quantized(spec="fp8", dtype=torch.float32, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(_config()), dtype=dtype).eval()
    quantize_model(model, spec)
    return model


def _ids(n=24, seed=0):
    return torch.randint(0, 128, (2, n), generator=torch.Generator().manual_seed(seed))


def dense_reference(x, weight):
    """float64: the per-token fake-quant activation times the fake-quant weight, summed in float64."""
    xq, xs = quantize_act_fp8(x.reshape(-1, x.shape[-1]))
    return torch.nn.functional.linear(xq.double() * xs.double(), weight.double()).reshape(*x.shape[:-1], -1)


def _fp8_spec(w_gran="channel", a_gran="token", dynamic=True):
    return QuantSpec(weight=TensorSpec(bits=8, format="fp8", granularity=w_gran),
                     activation=TensorSpec(bits=8, format="fp8", granularity=a_gran, dynamic=dynamic))


@pytest.mark.lane
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_gran", ["channel", "tensor"])
def test_fp8_round_trip_weights_bit_equal_logits_within_rounding(tmp_path, dtype, w_gran):
    from safetensors.torch import load_file

    model = _quantized(_fp8_spec(w_gran), dtype)
    out = convert_model(model, tmp_path / "fp8")
    tensors = load_file(str(out / "model.safetensors"))
    rt = load_quantized(out)
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        w, s = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
        assert w.dtype == FP8 and tuple(w.shape) == (mod.out_features, mod.in_features)
        assert s.dtype == torch.float32 and tuple(s.shape) == ((1,) if w_gran == "tensor" else (mod.out_features, 1))
        layer = rt.get_submodule(name)
        assert isinstance(layer, Fp8Linear)
        # e4m3 * scale in fp32 is the fake-quant weight bit for bit (before and after its cast to the model dtype)
        dense = layer.dequantized_weight(torch.float32)
        assert torch.equal(dense, w.float() * s.float().reshape(-1, 1))
        assert torch.equal(dense.to(dtype), mod.quantized_weight())
        n += 1
    assert n == N_LINEARS
    ids = _ids()
    with torch.no_grad():
        ref, got = model(ids).logits, rt(ids).logits
    if dtype == torch.float32:  # fp32 products of e4m3 values are exact: only the summation order differs
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:  # bf16: the fake-quant model rounds its quantized activations and weights to bf16 before the matmul
        torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    # converting the loaded runtime model again writes the same tensors
    again = load_file(str(convert_model(rt, tmp_path / "again") / "model.safetensors"))
    assert again.keys() == tensors.keys() and all(torch.equal(again[k].view(torch.uint8) if again[k].dtype == FP8
                                                              else again[k], tensors[k].view(torch.uint8)
                                                              if tensors[k].dtype == FP8 else tensors[k])
                                                  for k in tensors)


@pytest.mark.lane
def test_fp8_linear_matches_a_float64_reference_and_the_fake_quant_activation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 256, generator=g) * torch.logspace(-2, 1, 256)  # outlier channels
    x[0, 0] = 0.0  # an all-zero token stays zero
    w = torch.randn(96, 256, generator=g) * 0.05
    spec = parse("fp8")
    wq = fake_quant(w, spec.weight)  # per-channel fake quant: rows are output channels
    scale = (w.abs().amax(1, keepdim=True) / 448.0).clamp_min(1e-8)
    codes = (w / scale).clamp(-448, 448).to(FP8)
    assert torch.equal(codes.float() * scale, wq)
    # the runtime's per-token activation codes are the fake quant's
    xq, xs = quantize_act_fp8(x.reshape(-1, 256))
    fq = fake_quant(x.reshape(-1, 256), spec.activation).reshape(x.shape)
    assert torch.equal((xq.float() * xs).reshape(x.shape), fq)
    bias = torch.randn(96, generator=g)
    got = linear_fp8(x, codes, scale, bias, impl="reference")
    ref = dense_reference(x, wq) + bias.double()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert torch.equal(got[0, 0], bias)  # zero token: zero codes, the bias alone


def test_tampered_fp8_checkpoint_is_refused(tmp_path):
    out = convert_model(_quantized(), tmp_path / "fp8")
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0x01  # one bit of one e4m3 weight
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="truncated or modified"):
        load(out)


def test_fp8_folder_matches_vllms_fp8_rule_and_its_card_says_so(tmp_path, capsys):
    from compressed_tensors.quantization import QuantizationConfig

    out = convert_model(_quantized(), tmp_path / "fp8")
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    QuantizationConfig.model_validate(q)
    assert q["format"] == "float-quantized" and q["kv_cache_scheme"] is None
    (group,) = q["config_groups"].values()
    assert group["weights"] == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel",
                                "dynamic": False, "group_size": None, "observer": "minmax"}
    assert {k: group["input_activations"][k] for k in ("num_bits", "type", "strategy", "dynamic", "symmetric")} == \
        {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
    assert vllm_oracle(group, q["format"]) == "W8A8Fp8" == vllm_scheme(group, q["format"])[0]
    assert "vLLM: runs it: 14 layers as W8A8Fp8" in capsys.readouterr().err
    card = (out / "README.md").read_text()
    assert "fp8 weights" in card and "W8A8Fp8" in card and "fp8 (e4m3) activations" in card
    assert cfg["distqat_export"]["spec"]["weight"]["format"] == "fp8"
    assert load(out).model.layers[0].mlp.down_proj.__class__ is Fp8Linear  # qat.load.load: the int folder kind


@pytest.mark.parametrize("spec,match", [
    (_fp8_spec(a_gran="tensor", dynamic=False), "static per tensor"),
    (_fp8_spec(a_gran="tensor"), "dynamic per tensor"),
    (QuantSpec(weight=TensorSpec(bits=8, format="fp8")), "fp8 weights with no activation quantization"),
    (QuantSpec(weight=TensorSpec(bits=8, format="fp8", granularity="group", group_size=32),
               activation=TensorSpec(bits=8, format="fp8", granularity="token")), "per group"),
])
def test_unsupported_fp8_variants_are_refused_naming_what_converts(tmp_path, spec, match):
    model = _quantized(spec)  # convert refuses before any forward: a static scale needs no calibration here
    with pytest.raises(FormatError, match=match) as e:
        convert_model(model, tmp_path / "fp8")
    assert "quant.scheme=fp8" in str(e.value)
    assert not (tmp_path / "fp8").exists() or not any((tmp_path / "fp8").iterdir())


def test_compressed_tensors_decompresses_the_fp8_folder_to_our_weights(tmp_path):
    out = convert_model(_quantized(), tmp_path / "fp8")
    rt = load_quantized(out)
    dense = compressed_tensors_weights(out)
    assert len(dense) == N_LINEARS
    for name, w in dense.items():
        assert w.dtype == torch.float32
        assert torch.equal(w, rt.get_submodule(name).dequantized_weight(torch.float32)), name


def test_transformers_from_pretrained_gives_the_fake_quant_logits_on_cpu(tmp_path):
    model = _quantized()
    out = convert_model(model, tmp_path / "fp8")
    got, ref, a16 = hf_and_fake_quant_logits(model, out, _ids())
    assert torch.equal(got, ref)  # weights decompressed, activations fake-quantized per token to e4m3 as ours
    assert not torch.equal(got, a16)


@pytest.mark.parametrize("method", ["rtn", "smoothquant+rtn"])
def test_ptq_at_fp8_writes_folders_that_convert_and_load(tmp_path, method):
    from transformers import AutoModelForCausalLM

    from qat.ptq import PTQConfig, run_ptq

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(_config()), dtype=torch.float32).eval()
    model, _ = run_ptq(model, parse("fp8"), PTQConfig(method=method, progress=False, batch_size=2), _ids(32, seed=5))
    model.save_pretrained(tmp_path / "ptq")
    rt = load(convert_folder(tmp_path / "ptq", tmp_path / "fp8"))
    fq = load(tmp_path / "ptq")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(rt(ids).logits, fq(ids).logits, rtol=1e-5, atol=1e-5)
    for name, mod in fq.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(rt.get_submodule(name).dequantized_weight(torch.float32), mod.quantized_weight())


def test_gptq_at_fp8_stays_refused():
    from qat.ptq import PTQConfig, check

    with pytest.raises(ValueError, match="fp8 weights take rtn"):
        check(parse("fp8"), PTQConfig(method="gptq"))


@pytest.mark.cuda  # torch._scaled_mm on a GPU of compute capability 8.9+
def test_scaled_mm_path_matches_the_reference_on_cuda():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(33, 512, generator=g) * 2).cuda().to(torch.bfloat16)
    w = torch.randn(256, 512, generator=g).cuda() * 0.05
    scale = (w.abs().amax(1, keepdim=True) / 448.0).float()
    codes = (w / scale).clamp(-448, 448).to(FP8)
    bias = torch.randn(256, generator=g).cuda().to(torch.bfloat16)
    ref = linear_fp8(x, codes, scale, bias, impl="reference")
    if not scaled_mm_supported(x, 256, 512):
        pytest.skip(f"compute capability {torch.cuda.get_device_capability()} < 8.9: the reference runs")
    got = linear_fp8(x, codes, scale, bias)
    torch.testing.assert_close(got.float(), ref.float(), rtol=0.02, atol=0.02 * ref.float().abs().max().item())
    assert scaled_mm_supported(x, 256, 512), "torch._scaled_mm failed and fell back"


def test_distqat_ptq_smoothquant_fp8_then_convert(tmp_path, bundled_tokenizer):
    from qat.io.folders import Kind, inspect
    from trainer.cli import main

    teacher = save_tiny_teacher(tmp_path / "teacher", bundled_tokenizer)
    assert main(["ptq", PUBLISHED, f"model.name_or_path={teacher}", "ptq.method=smoothquant+rtn", "quant.scheme=fp8",
                 "ptq.progress=false", "ptq.n_samples=4", "ptq.seq_len=32", f"output_dir={tmp_path / 'ptq'}"]) == 0
    folder = inspect(tmp_path / "ptq" / "model")
    assert folder.kind is Kind.PTQ and folder.spec.weight.format == "fp8"
    assert main(["convert", str(tmp_path / "ptq" / "model"), "--out", str(tmp_path / "fp8")]) == 0
    assert inspect(tmp_path / "fp8").kind is Kind.INT
    rt, fq = load(tmp_path / "fp8"), load(tmp_path / "ptq" / "model")
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # fp32, 49k-wide head: summation order alone moves a logit by ~1e-5
        torch.testing.assert_close(rt(ids).logits, fq(ids).logits, rtol=1e-4, atol=5e-5)


def test_qlora_refuses_an_fp8_folder_naming_what_it_packs(tmp_path):
    from qat.qlora.base import build_base

    out = convert_model(_quantized(), tmp_path / "fp8")
    with pytest.raises(ValueError, match=r"FP8 \(e4m3\) folder: QLoRA packs integer or NF4 grids"):
        build_base(out, None)

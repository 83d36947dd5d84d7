"""Conversion to integer checkpoints: packing, codes equal to the fake-quant model's, compressed-tensors
compatibility, the integer runtime's outputs, the integer KV cache, and refusal of broken files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import LANE, PUBLISHED
from helpers.models import fake_quant_folder

from qat.apply import quantize_model
from qat.export import convert_model, load_quantized
from qat.export.format import FormatError
from qat.linear import QuantLinear
from qat.runtime.int_linear import IntLinear
from qat.runtime.pack import pack_int32, unpack_int32

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [1, 7, 32, 33, 64, 100, 576])
def test_pack_roundtrip_and_compressed_tensors_layout(bits, cols):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    u = torch.randint(0, 1 << bits, (5, cols), generator=g)
    packed = pack_int32(u, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-cols * bits // 32))
    assert torch.equal(unpack_int32(packed, bits, cols).long(), u)
    signed = (u - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(packed, helpers.pack_to_int32(signed, bits))
    if bits == 4:  # two codes per byte, low nibble first
        b = packed.view(torch.uint8)
        assert int(b[0, 0]) == int(u[0, 0]) | (int(u[0, 1]) << 4) if cols > 1 else True


def test_pack_refuses_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit 4 bits"):
        pack_int32(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, 64)


SCHEMES = ["w4g32", "w4g32asym", "w4", "w3g32asym", "w8", "w8a8", "w4a8kv8", "w4g32a8kv4", "w8asyma8"]


def _quantized(tiny_model, scheme, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    cfg = tiny_model("llama").config
    torch.manual_seed(0)
    # Built in its dtype as from_pretrained would: .to(bf16) would also round the fp32 RoPE frequencies.
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    quantize_model(model, scheme)
    return model


@pytest.mark.parametrize("scheme", SCHEMES)
def test_converted_codes_and_scales_equal_the_fake_quant_models(tiny_model, tmp_path, scheme):
    model = _quantized(tiny_model, scheme)
    out = convert_model(model, tmp_path / "int")
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        codes, scale, zero = mod.weight_quantizer.quantize(mod.weight)
        spec = mod.weight_spec
        off = 1 << (spec.bits - 1)
        unsigned = codes + off if spec.symmetric else codes
        if f"{name}.weight_packed" in tensors:
            got = unpack_int32(tensors[f"{name}.weight_packed"], spec.bits, mod.in_features).long()
        else:
            got = tensors[f"{name}.weight"].long() + off
        assert torch.equal(got, unsigned.long()), name
        stored = tensors[f"{name}.weight_scale"]
        assert stored.dtype == torch.bfloat16
        assert torch.equal(stored.float(), scale.float()), name  # bit for bit
        assert (f"{name}.weight_zero_point" in tensors) == (not spec.symmetric)
        n += 1
    assert n == 14
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["ignore"] == ["lm_head"]
    assert "distqat_quant" not in cfg and "lm_head.weight" not in tensors or not cfg["tie_word_embeddings"]


def _ids(vocab=128, n=24, seed=0):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.lane
@pytest.mark.parametrize("scheme", ["w4g32", "w4g32asym", "w3g32asym", "w8", "w4"])
def test_weight_only_runtime_equals_fake_quant_exactly(tiny_model, tmp_path, scheme):
    model = _quantized(tiny_model, scheme)
    out = convert_model(model, tmp_path / "int")
    rt = load_quantized(out)
    assert sum(isinstance(m, IntLinear) for m in rt.modules()) == 14
    ids = _ids()
    with torch.no_grad():
        ref, got = model(ids).logits, rt(ids).logits
    assert torch.equal(ref, got)  # the dequantized weights are bit-identical, the matmuls the same


@pytest.mark.lane
@pytest.mark.parametrize("scheme", ["w8a8", "w4a8kv8", "w4g32a8kv4", "w8asyma8"])
def test_int8_activation_runtime_matches_fake_quant_within_bf16_rounding(tiny_model, tmp_path, scheme):
    model = _quantized(tiny_model, scheme)
    rt = load_quantized(convert_model(model, tmp_path / "int"))
    ids = _ids()
    with torch.no_grad():
        ref, got = model(ids).logits.float(), rt(ids).logits.float()
        fp32 = _quantized(tiny_model, scheme, torch.float32)(ids).logits.float()
    # Integer accumulation vs a bf16 matmul: the gap is bf16 rounding, the size of bf16-vs-fp32 itself.
    err = (got - ref).abs().max().item()
    assert err <= 2 * (ref - fp32).abs().max().item() + 1e-3, err
    # An absolute sanity bound. kv4 turns one-ulp differences into whole codes: there bf16 against fp32 alone moves
    # the logits by 8-14% of the largest (w4g32a8kv4 on this model, each weight grid), so its bound is wider.
    assert err < (0.1 if "kv4" in scheme else 0.05) * ref.abs().max().item()


@pytest.mark.parametrize("kv,bits", [("w4g32a8kv8", 8), pytest.param("w4g32a8kv4", 4, marks=pytest.mark.lane)])
def test_generate_with_the_integer_kv_cache_matches_fake_quant(tiny_model, tmp_path, kv, bits, kernel_calls):
    from transformers import DynamicCache

    from qat.io.models import cache_kwarg
    from qat.runtime.kv_cache import IntKVCache

    new = 4 if LANE else 12  # the interpreter runs every decode step's kernels: fewer steps in the lane
    model = _quantized(tiny_model, kv, torch.float32)
    rt = load_quantized(convert_model(model, tmp_path / kv))
    ids = _ids(n=8, seed=1)
    kw = dict(max_new_tokens=new, do_sample=False, pad_token_id=0)
    arg = cache_kwarg(model)  # `cache` on current transformers, `past_key_values` before
    ref = model.generate(ids, **{arg: DynamicCache()}, **kw)
    cache = IntKVCache(rt.kv_spec, 2)
    got = rt.generate(ids, **{arg: cache}, **kw)
    assert torch.equal(ref, got), kv
    assert kernel_calls["linear_a8"] > 0 if LANE else not kernel_calls  # decode steps on the int8 kernel
    assert torch.equal(rt.generate(ids, **kw), got)  # the default cache is the integer one
    # codes take bits/8 bytes per element (+ one fp32 scale per token or head-token)
    full = 2 * 2 * 2 * (8 + new - 1) * 2 * 16 * 4  # layers * k/v * batch * tokens * kv heads * head_dim * fp32
    assert cache.nbytes() < full * (bits / 32 + 0.15)
    with torch.no_grad():  # prefill logits with and without the cache agree bit for bit
        a = rt(ids, **{arg: IntKVCache(rt.kv_spec, 2)}, use_cache=True).logits
        b = rt(ids, use_cache=False).logits
    assert torch.equal(a, b)


def test_tampered_or_truncated_checkpoints_are_refused(tiny_model, tmp_path):
    out = convert_model(_quantized(tiny_model, "w4g32"), tmp_path / "int")
    f = out / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the last weight
    f.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum"):
        load_quantized(out)
    f.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(FormatError, match="truncated or modified"):
        load_quantized(out)
    # Without the checksum record, a truncated file is still caught by the reader.
    cfg = json.loads((out / "config.json").read_text())
    cfg["distqat_export"].pop("sha256")
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="truncated or corrupt"):
        load_quantized(out)


def test_convert_refuses_what_the_runtime_cannot_run_and_writes_nothing(tiny_model, tmp_path):
    for scheme, msg in (("w4a6", "no integer kernel"), ("wnf4g32", "no integer packing")):  # a4 runs (fp4 tests)
        with pytest.raises(FormatError, match=msg):
            convert_model(_quantized(tiny_model, scheme), tmp_path / scheme)
        assert not (tmp_path / scheme).exists()
    assert not list(tmp_path.glob(".*tmp*"))
    out = convert_model(_quantized(tiny_model, "w4g32"), tmp_path / "int")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_model(_quantized(tiny_model, "w4g32"), out)


def test_cli_convert(tiny_model, tmp_path):
    from qat.keys import QUANT_KEY

    model = _quantized(tiny_model, "w4g32a8kv8")
    src = tmp_path / "src"
    model.save_pretrained(src)
    assert QUANT_KEY in json.loads((src / "config.json").read_text())
    run = lambda *a: subprocess.run([sys.executable, "-m", "trainer", "convert", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run(str(src), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-2000:]
    rt = load_quantized(tmp_path / "out")
    ids = _ids()
    with torch.no_grad():
        assert (rt(ids).logits.float() - model(ids).logits.float()).abs().max() < 0.05
    r = run(str(tmp_path / "missing"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "no config.json" in r.stderr and r.stderr.count("\n") == 1
    # A rerun (the first was killed after its rename) keeps the same source's conversion; another source's is refused.
    before = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    r = run(str(src), "--out", str(tmp_path / "out"))
    assert r.returncode == 0 and "converted already" in r.stderr, r.stderr[-2000:]
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == before
    _quantized(tiny_model, "w4g32").save_pretrained(tmp_path / "other")
    r = run(str(tmp_path / "other"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "not empty" in r.stderr


@pytest.mark.slow
def test_bundled_model_converted_logits_match_fake_quant(tmp_path, bundled_tokenizer):
    from qat.io.models import load_model

    text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
    ids = bundled_tokenizer(text, return_tensors="pt").input_ids
    models = {}
    for dt in ("float32", "bfloat16"):
        models[dt] = load_model("bundled:smollm2-135m", dtype=dt)
        quantize_model(models[dt], "w4g64a8kv8")
    rt = load_quantized(convert_model(models["bfloat16"], tmp_path / "int"))
    with torch.no_grad():
        fq32, fq16, got = (m(ids).logits.float() for m in (models["float32"], models["bfloat16"], rt))
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    # Integer accumulation differs from the bf16 fake-quant matmul by less than bf16 rounding itself does
    # (bf16 vs fp32 fake quant), and is no further from the fp32 fake-quant model than bf16 is.
    assert rel(got, fq16) < rel(fq16, fq32), (rel(got, fq16), rel(fq16, fq32))
    assert rel(got, fq32) < 1.1 * rel(fq16, fq32)
    assert (got.argmax(-1) == fq16.argmax(-1)).float().mean() >= 0.8  # 17 of 21 tokens on the full signed range


def test_quantized_tied_lm_head_is_untied_in_the_checkpoint(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_model("llama").config
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    quantize_model(model, "w4g32", exclude=[], overrides={"lm_head": "w8"})
    rt = load_quantized(convert_model(model, tmp_path / "int"))
    assert isinstance(rt.lm_head, IntLinear) and rt.lm_head.bits == 8
    assert not rt.config.tie_word_embeddings
    assert torch.equal(rt.model.embed_tokens.weight, model.model.embed_tokens.weight)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(rt(ids).logits, model(ids).logits)


def test_eval_scores_a_converted_folder_like_its_fake_quant_source(tmp_path, bundled_tokenizer):
    from qat.export import convert_folder
    from trainer.cli import main

    model, fq = fake_quant_folder(tmp_path, bundled_tokenizer, "w4g32")
    convert_folder(fq, tmp_path / "int")
    assert (tmp_path / "int" / "tokenizer.json").is_file()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    ppl = {}
    for name in ("fq", "int"):
        assert main(["eval", PUBLISHED,
                     f"model.name_or_path={tmp_path / name}", f"data.path={corpus}", "eval.max_tokens=96",
                     "eval.seq_len=32", "model.dtype=bfloat16", f"output_dir={tmp_path / ('ev' + name)}"]) == 0
        ppl.update(json.loads((tmp_path / ("ev" + name) / "eval.json").read_text())["perplexity"])
    assert set(ppl) == {"w4g32 (saved)", "w4g32 (int)"}
    assert ppl["w4g32 (int)"] == ppl["w4g32 (saved)"]  # weight-only: the same logits bit for bit


@pytest.mark.lane
def test_linears_with_bias_convert_exactly(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_model("qwen2").config  # q/k/v projections carry a bias
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    quantize_model(model, "w4g32")
    rt = load_quantized(convert_model(model, tmp_path / "int"))
    q = rt.model.layers[0].self_attn.q_proj
    assert q.bias is not None and torch.equal(q.bias, model.model.layers[0].self_attn.q_proj.bias)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(rt(ids).logits, model(ids).logits)

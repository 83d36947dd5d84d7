"""A QA-LoRA merge as standard readers see it: written with float zero points (format version 4), transformers'
from_pretrained computes distqat's logits; a version 2 folder (weight_offset) is read by distqat alone; and every
line of a folder's README is checked against the reader it names."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from helpers.models import fake_and_packed, tiny_ids
from helpers.readers import compressed_tensors_weights, vllm_loads, vllm_oracle

from qat.export import convert_model, load_quantized
from qat.export import load as export_load
from qat.export.convert import convert_folder
from qat.export.readers import folder_notes, vllm_scheme
from qat.export.real_zero import split_real_zero
from qat.qlora.adapters import add_adapters
from qat.qlora.config import LoRAConfig
from qat.qlora.merge import merge_qalora
from qat.runtime.int_linear import IntLinear

ct = pytest.importorskip("compressed_tensors")


def qalora(scheme="w4g32asym", dtype=torch.float32, std=0.05):
    """A tiny packed base with random QA-LoRA adapters (large enough to move the logits well past rounding)."""
    _, packed = fake_and_packed(scheme, dtype)
    model = add_adapters(packed, LoRAConfig(r=2, dropout=0.0, dtype="float32", variant="qalora"))
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = (torch.randn(p.shape, generator=g) * std).to(p.dtype)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits.double()


def readme_notes(folder) -> list[str]:
    text = (folder / "README.md").read_text().split("## Who reads it\n\n")[1].split("\n\n")[0]
    return [line[2:] for line in text.splitlines()]


def weights64(layer: IntLinear) -> torch.Tensor:
    """(code - zero) * scale + offset of a loaded layer in fp64."""
    codes, zero = layer.unsigned_codes()
    g = layer.group_size
    z = torch.full_like(layer.scale, 1 << (layer.bits - 1), dtype=torch.float64) if zero is None else zero.double()
    w = (codes.double().reshape(layer.out_features, -1, g) - z.unsqueeze(-1)) * layer.scale.double().unsqueeze(-1)
    if layer.offset is not None:
        w = w + layer.offset.double().unsqueeze(-1)
    return w.reshape(layer.out_features, -1)


@pytest.mark.parametrize("scheme,dtype", [("w4g32asym", torch.float32), ("w4g32", torch.float32),
                                          ("w8g32asym", torch.float32), ("w4g32asym", torch.bfloat16)])
def test_a_qalora_merge_loads_in_transformers_with_distqats_logits(tmp_path, scheme, dtype):
    from compressed_tensors.quantization import QuantizationConfig

    model, x = qalora(scheme, dtype), tiny_ids()
    trained = logits(model, x)
    with model.disable_adapter():
        base = logits(model, x)
    merged = merge_qalora(model)
    out = convert_model(merged, tmp_path / "int")
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    QuantizationConfig.model_validate(q)  # the reader's own schema
    assert cfg["distqat_export"]["version"] == 4 and q["format"] == "naive-quantized"
    assert all(g["weights"]["zp_dtype"] == "torch.float32" and not g["weights"]["symmetric"]
               for g in q["config_groups"].values())
    rt = load_quantized(out, dtype=dtype)
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=dtype)  # the default path: no dequantize=True
    ours, theirs = logits(rt, x), logits(hf, x)
    scale = trained.abs().max()
    assert (trained - base).abs().max() > 0.1 * scale  # the adapter matters: dropping it would show
    # fp32: the weights agree to fp32 rounding (a different order of the same products); bf16: to bf16 rounding
    tol = 1e-5 if dtype == torch.float32 else 0.03
    assert (ours - theirs).abs().max() <= tol * scale
    assert (theirs - trained).abs().max() <= tol * scale
    # weight by weight: compressed-tensors' own decompressor against distqat's (code - zero) * scale + offset
    if dtype == torch.float32:
        dense = compressed_tensors_weights(out)
        layers = {n: m for n, m in rt.named_modules() if isinstance(m, IntLinear)}
        assert dense.keys() == layers.keys()
        for n, w in dense.items():
            ref = weights64(layers[n])
            assert (w.double() - ref).abs().max() <= 4e-7 * ref.abs().max(), n


def test_split_real_zero_gives_the_same_weights_in_fp64():
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.01
    zp = torch.randn(5, 3, generator=g, dtype=torch.float64) * 6  # some beyond the 4-bit range [-8, 7]
    zp[0, 0] = 11.3
    zi, offset = split_real_zero(zp, scale, 4, "layer")
    assert zi.dtype == torch.int8 and int(zi.min()) >= -8 and int(zi.max()) <= 7
    codes = torch.arange(-8, 8, dtype=torch.float64).reshape(1, 1, -1)
    want = (codes - zp.unsqueeze(-1)) * scale.unsqueeze(-1)
    got = (codes - zi.double().unsqueeze(-1)) * scale.unsqueeze(-1) + offset.double().unsqueeze(-1)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()  # the offset is stored in fp32
    with pytest.raises(ValueError, match="weight_zero_point: found"):
        split_real_zero(zp[:, :2], scale, 4, "layer")


@pytest.mark.parametrize("version", [4, 2])
def test_every_reader_note_holds_for_the_reader_it_names(tmp_path, version):
    from transformers import CompressedTensorsConfig

    model, x = qalora(), tiny_ids()
    trained = logits(model, x)
    with model.disable_adapter():
        base = logits(model, x)
    out = convert_model(merge_qalora(model), tmp_path / "int", real_zero=version == 4)
    assert json.loads((out / "config.json").read_text())["distqat_export"]["version"] == version
    notes = readme_notes(out)
    assert notes == folder_notes(out)  # the card says what the folder holds, recomputed from the folder
    vllm, hf_note, ours = (next(n for n in notes if n.startswith(w)) for w in ("vLLM:", "transformers", "distqat:"))
    scale = trained.abs().max()

    # vLLM: the note agrees with its rules restated from its source (tests/helpers/readers.py)
    assert vllm.startswith("vLLM: runs it") == vllm_loads(out) and vllm.startswith("vLLM: cannot load it")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    for group in q["config_groups"].values():  # the scheme the note names is the one its rules pick
        assert vllm_scheme(group, group["format"])[0] == vllm_oracle(group, q["format"])
    assert ("weight_offset" in vllm) == (version == 2) and ("float zero points" in vllm) == (version == 4)

    # distqat: its runtime computes the merged model
    assert "load_quantized(path) runs it" in ours and "real-valued zero points" in ours
    assert (logits(load_quantized(out, dtype=torch.float32), x) - trained).abs().max() <= 1e-5 * scale

    # transformers: what the note says it does, it does
    if version == 4:
        assert "from_pretrained(path) loads it" in hf_note and "the same logits" in hf_note
        hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert (logits(hf, x) - trained).abs().max() <= 1e-5 * scale
    else:
        assert "fails" in hf_note and "drops every weight_offset" in hf_note and "without the merged adapter" in hf_note
        assert "the same logits" not in hf_note
        with pytest.raises(RuntimeError):
            tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
        got = logits(hf, x)
        assert (got - base).abs().max() <= 1e-5 * scale  # the base: the adapter is gone
        assert (got - trained).abs().max() > 0.1 * scale


def test_convert_writes_a_version_2_folder_again_as_version_4_which_runs_in_transformers(tmp_path):
    model, x = qalora(), tiny_ids()
    trained = logits(model, x)
    old = convert_model(merge_qalora(model), tmp_path / "v2", real_zero=False)
    new = convert_folder(old, tmp_path / "v4", dtype=torch.float32)  # what `distqat convert <v2> --out` runs
    assert json.loads((new / "config.json").read_text())["distqat_export"]["version"] == 4
    hf = tf.AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32)
    assert (logits(hf, x) - trained).abs().max() <= 1e-5 * trained.abs().max()
    with pytest.raises(ValueError, match="is converted already"):  # nothing to rewrite in a version 4 folder
        convert_folder(new, tmp_path / "again")


def test_older_readers_refuse_version_4(tmp_path, monkeypatch):
    out = convert_model(merge_qalora(qalora()), tmp_path / "int")
    monkeypatch.setattr(export_load, "READ_VERSIONS", (1, 2, 3))
    with pytest.raises(ValueError, match="format version 4; this distqat reads versions 1, 2, 3"):
        load_quantized(out)

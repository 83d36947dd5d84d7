"""Merging QLoRA adapters: QA-LoRA into the zero points (format version 2 here; version 4, which standard readers
run, in test_qalora_serve), requant onto the grid, bf16."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import fake_and_packed, tiny_ids

from qat.export import load_quantized
from qat.export.convert import convert_folder, convert_model
from qat.load import Kind, inspect, load
from qat.qlora.adapters import add_adapters
from qat.qlora.config import LoRAConfig
from qat.qlora.merge import merge_bf16, merge_qalora, merge_requant
from qat.runtime.packed import PackedLinear


def with_adapters(scheme="w4g32asym", dtype=torch.float32, zero=False, std=0.05, **lora):
    _, packed = fake_and_packed(scheme, dtype)
    model = add_adapters(packed, LoRAConfig(**{"r": 2, "dropout": 0.0, "dtype": "float32", **lora}))
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_" in n:  # fp64 adapters on an fp64 base, so that the merge is checked to fp64 rounding
            value = torch.zeros(p.shape) if zero else torch.randn(p.shape, generator=g) * std
            p.data = value.to(torch.float64 if dtype == torch.float64 else p.dtype)
    return model


def packed_state(model):
    """Codes, scales and zero points per packed linear, by its name in the bare base."""
    return {n.replace(".base_layer", ""): (m.qweight.clone(), None if m.scale is None else m.scale.clone(),
                                           None if m.zero is None else m.zero.clone())
            for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def test_qalora_merge_folds_exactly_into_the_zero_points():
    model = with_adapters(dtype=torch.float64, variant="qalora")
    x = tiny_ids()
    with torch.no_grad():
        want = model(x).logits
    before = packed_state(model.base_model.model)
    merged = merge_qalora(model)
    after = packed_state(merged)
    assert before.keys() == after.keys()
    for n in before:  # codes, scales and integer zero points unchanged
        assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(before[n], after[n]))
    offsets = [m.offset for m in merged.modules() if isinstance(m, PackedLinear)]
    assert offsets and all(o is not None and o.abs().max() > 0 for o in offsets)
    with torch.no_grad():
        got = merged(x).logits
    assert (got - want).abs().max() < 1e-10


def test_qalora_merge_converts_to_a_version_2_checkpoint(tmp_path):
    model = with_adapters(dtype=torch.bfloat16, variant="qalora")
    merged = merge_qalora(model)
    out = convert_model(merged, tmp_path / "int", real_zero=False)  # version 4 (float zero points): test_qalora_serve
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["distqat_export"]["version"] == 2
    rt = load_quantized(out)
    assert any(m.offset is not None for m in rt.modules() if hasattr(m, "offset"))
    x = tiny_ids()
    with torch.no_grad():
        a, b = merged(x).logits.float(), rt(x).logits.float()
    assert (a - b).abs().max() <= 0.02 * a.abs().max()  # bf16 rounding: offsets summed per group vs in the weight
    assert inspect(out).kind is Kind.INT and load(out) is not None


def test_older_readers_refuse_version_2(tmp_path, monkeypatch):
    from qat.export import load as export_load

    out = convert_model(merge_qalora(with_adapters(dtype=torch.bfloat16, variant="qalora")), tmp_path / "int",
                        real_zero=False)
    monkeypatch.setattr(export_load, "READ_VERSIONS", (1,))
    with pytest.raises(ValueError, match="format version 2; this distqat reads versions 1"):
        load_quantized(out)
    plain = convert_model(fake_and_packed("w4g32", torch.bfloat16)[1], tmp_path / "v1")
    assert json.loads((plain / "config.json").read_text())["distqat_export"]["version"] == 1


@pytest.mark.parametrize("scheme", ["w4g32", "w4g32asym", "w8g32asym", "w4"])
def test_requant_of_a_zero_adapter_gives_the_base_back_bit_for_bit(scheme, tmp_path):
    model = with_adapters(scheme, zero=True)
    base_codes = {n.replace(".base_layer", ""): m.unsigned_codes() for n, m in model.base_model.model.named_modules()
                  if isinstance(m, PackedLinear)}
    base_w = {n.replace(".base_layer", ""): m.dequantized_weight() for n, m in model.base_model.model.named_modules()
              if isinstance(m, PackedLinear)}
    merged, report = merge_requant(model, "rtn")
    assert len(report) == len(base_w) and all(r["error"] == 0.0 and r["adapter_lost"] is None for r in report)
    merged.save_pretrained(tmp_path / "m")
    folder = inspect(tmp_path / "m")
    assert folder.kind is Kind.PTQ
    again = load(tmp_path / "m")
    for name, w in base_w.items():
        q = again.get_submodule(name)
        assert torch.equal(q.quantized_weight().detach(), w), name
    # ... and it converts to the same integer codes
    rt = load_quantized(convert_folder(tmp_path / "m", tmp_path / "int"))
    for name, (codes, zero) in base_codes.items():
        got_codes, got_zero = rt.get_submodule(name).unsigned_codes()
        assert torch.equal(got_codes.int(), codes.int())
        assert (got_zero is None) == (zero is None) and (zero is None or torch.equal(got_zero.int(), zero.int()))


def test_requant_keeps_most_of_a_real_adapter_and_reports_it():
    model = with_adapters("w8g32asym", std=0.02)  # adapters moving each weight by a few percent
    x = tiny_ids()
    with torch.no_grad():
        want = model(x).logits
    merged, report = merge_requant(model, "rtn")
    adapted = [r for r in report if r["adapter_lost"] is not None]
    assert adapted and all(0 < r["error"] < 0.01 for r in adapted)
    with torch.no_grad():
        got = merged(x).logits
    assert (got - want).abs().mean() < 0.1 * (want - want.mean()).abs().mean()


def test_requant_gptq_needs_calibration_and_then_runs():
    model = with_adapters("w4g32")
    with pytest.raises(ValueError, match="lora.requant=gptq needs calibration"):
        merge_requant(model, "gptq")
    merged, report = merge_requant(with_adapters("w4g32"), "gptq", calib_ids=tiny_ids(4, 32))
    assert report and merged.config.distqat_ptq["method"] == "qlora+requant-gptq"


def test_bf16_merge_is_a_plain_model_computing_base_plus_adapter(tmp_path):
    model = with_adapters("w4g32asym")
    x = tiny_ids()
    with torch.no_grad():
        want = model(x).logits
    merged = merge_bf16(model, torch.float32)
    assert not any(isinstance(m, PackedLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, want, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "b")
    assert inspect(tmp_path / "b").kind is Kind.BASE


def test_merge_refusals_name_the_key_and_the_fix():
    with pytest.raises(ValueError, match=r"lora.merge=qalora folds QA-LoRA adapters only.*lora.merge=requant"):
        merge_qalora(with_adapters("w4g32"))
    with pytest.raises(ValueError, match=r"lora.merge=qalora needs an integer weight-only.*requant or bf16"):
        merge_qalora(with_adapters("w4g32a8", variant="qalora"))
    with pytest.raises(ValueError, match="lora.requant='nearest': use rtn, gptq, gptq-grid or gptq-keep"):
        merge_requant(with_adapters("w4g32"), "nearest")

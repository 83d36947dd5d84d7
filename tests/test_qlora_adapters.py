"""Adapters in use: plain peft loads distqat's adapters once `qat.qlora.adapters` is imported (and still puts its
own layers on other models), `load_adapters` takes an adapter peft wrote on the unquantized model and refuses in
one line one that does not fit, and a resume names the adapter setting that changed."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import fake_and_packed, tiny_ids, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear

from qat.keys import QLORA_RECORD_FILE
from qat.qlora.adapter_fit import adapter_layout, layout_change
from qat.qlora.adapters import PackedLoraLinear, add_adapters, load_adapters, save_adapters
from qat.qlora.base import fingerprint
from qat.qlora.config import LoRAConfig

TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_adapter(path, model=None, **config):
    """An adapter written by peft alone on `model` (the unquantized tiny Llama by default), B non-zero."""
    model = tiny_llama() if model is None else model
    peft_model = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS,
                                                     "lora_dropout": 0.0, **config}))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    peft_model.save_pretrained(str(path))
    return peft_model


@pytest.mark.parametrize("variant", ["lora", "qalora"])
def test_plain_peft_loads_our_adapter_with_the_logits_of_load_adapters(tmp_path, variant):
    _, packed = fake_and_packed("w4g32")
    model = add_adapters(packed, LoRAConfig(r=2, dropout=0.0, variant=variant))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    save_adapters(model, tmp_path / "a", {"fingerprint": fingerprint(model.base_model.model), "base": "tiny"})
    x = tiny_ids()
    ours = load_adapters(fake_and_packed("w4g32")[1], tmp_path / "a")
    plain = PeftModel.from_pretrained(fake_and_packed("w4g32")[1], str(tmp_path / "a"))
    layer = plain.base_model.model.model.layers[1].mlp.down_proj
    assert isinstance(layer, PackedLoraLinear) and (variant == "qalora") == ("default" in layer.lora_variant)
    with torch.no_grad():
        want = ours(x).logits
        assert torch.equal(plain(x).logits, want)
        with plain.disable_adapter():
            assert (plain(x).logits - want).abs().max() > 1e-3  # the adapter is there and does something


def test_an_adapter_peft_wrote_on_the_unquantized_model_loads_onto_the_packed_base(tmp_path):
    # Written by peft after distqat's registration: an unquantized model still gets peft's own layers.
    written = peft_adapter(tmp_path / "peft")
    assert type(written.base_model.model.model.layers[0].self_attn.q_proj) is PeftLoraLinear
    assert not (tmp_path / "peft" / QLORA_RECORD_FILE).exists()
    fq, packed = fake_and_packed("w4g32")
    ours = load_adapters(packed, tmp_path / "peft", fingerprint=fingerprint(packed))
    adapted = [n for n, m in ours.named_modules() if isinstance(m, PackedLoraLinear)]
    assert len(adapted) == 2 * len(TARGETS)
    # The reference: the fake-quant model (QuantLinear is an nn.Linear) with the same adapter through peft alone.
    ref = PeftModel.from_pretrained(fq, str(tmp_path / "peft"))
    x = tiny_ids()
    with torch.no_grad():
        got, want = ours(x).logits, ref(x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with ours.disable_adapter():
            assert (ours(x).logits - got).abs().max() > 1e-3


def test_adapters_that_do_not_fit_are_refused_in_one_line(tmp_path):
    peft_adapter(tmp_path / "wide", tiny_llama(hidden=128))
    _, packed = fake_and_packed("w4g32")
    with pytest.raises(ValueError, match=r"down_proj\.lora_B is \(128, 4\), but this base's model\.layers\.0\.mlp\."
                                         r"down_proj has 64 outputs: the adapter was trained on another model"):
        load_adapters(packed, tmp_path / "wide")
    peft_adapter(tmp_path / "deep", three_layers())
    with pytest.raises(ValueError, match=r"adapts model\.layers\.2\.mlp\.down_proj, which this base does not have"):
        load_adapters(copy.deepcopy(packed), tmp_path / "deep")
    peft_adapter(tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError, match="is a DoRA adapter"):
        load_adapters(copy.deepcopy(packed), tmp_path / "dora")
    written = peft_adapter(tmp_path / "bin")
    (tmp_path / "bin" / "adapter_model.safetensors").unlink()
    written.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    (tmp_path / "bin" / "adapter_model.safetensors").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="adapter_model.bin, a pickle distqat does not load"):
        load_adapters(copy.deepcopy(packed), tmp_path / "bin")
    # Nothing was injected by the refused loads.
    assert not any(isinstance(m, PackedLoraLinear) for m in packed.modules())


def three_layers():
    """The tiny Llama with a third layer: an adapter on it adapts a layer the two-layer base lacks."""
    model = tiny_llama()
    model.model.layers.append(copy.deepcopy(model.model.layers[1]))
    model.config.num_hidden_layers = 3
    return model


def test_layout_change_names_the_setting():
    _, packed = fake_and_packed("w4g32")
    now = adapter_layout(add_adapters(copy.deepcopy(packed), LoRAConfig(r=2)))
    assert now["r"] == 2 and now["variant"] == "lora" and len(now["target_modules"]) == 14
    assert layout_change(now, now) is None and layout_change(None, now) is None
    assert layout_change({**now, "r": 4}, now) == "lora.r was 4 there and is 2 now"
    qa = adapter_layout(add_adapters(copy.deepcopy(packed), LoRAConfig(r=2, variant="qalora")))
    assert layout_change(now, qa) == "lora.variant was lora there and is qalora now"
    fewer = adapter_layout(add_adapters(copy.deepcopy(packed), LoRAConfig(r=2, target_modules=["*.q_proj"])))
    assert layout_change(now, fewer) == ("lora.target_modules adapted 14 layers there and 2 now (12 dropped, e.g. "
                                         "model.layers.0.mlp.down_proj)")
    assert layout_change(fewer, now).startswith("lora.target_modules adapted 2 layers there and 14 now (12 new")

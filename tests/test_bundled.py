"""The bundled SmolLM2-135M: offline load, cached conversion, generation, perplexity with fake quant."""


import pytest
import torch

import qat.io.models as models
from qat.apply import quantize_model
from qat.io.models import ModelError, load_model, resolve_model_path
from trainer.eval import perplexity

pytestmark = pytest.mark.slow


def test_second_load_reads_the_cache_and_is_the_expected_architecture(bundled_path, monkeypatch):
    load_model("bundled:smollm2-135m", dtype="float32")  # the cached folder exists after the fixture

    def no_gguf(name):
        raise AssertionError("a second load converted the GGUF again instead of reading the cache")

    monkeypatch.setattr(models, "_bundled_gguf", no_gguf)
    model = load_model("bundled:smollm2-135m", dtype="float32")
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.vocab_size == 49152 and c.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert not hasattr(c, "quantization_config"), "the GGUF quantizer state must not leak into the cache"
    # The cached weights are bf16 safetensors (what save_pretrained wrote), not a pickle.
    assert (bundled_path / "model.safetensors").is_file()


def test_greedy_generation_is_english(bundled_tokenizer):
    model = load_model("bundled:smollm2-135m", dtype="float32")
    ids = bundled_tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 20
    text = bundled_tokenizer.decode(out[0, ids.shape[1]:])
    assert text.strip().startswith("Paris"), text


def test_unknown_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="never downloads"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="unknown bundled model"):
        resolve_model_path("bundled:nope")


def test_fp_perplexity_in_expected_range(fp_ppl, wiki_test_windows):
    ppl, _ = fp_ppl
    assert [len(w) for w in wiki_test_windows] == [1024] * 8
    print(f"\nbundled SmolLM2-135M fp32 perplexity, 8192 test tokens, ctx 1024: {ppl:.3f}")
    assert 15.0 < ppl < 35.0


def _quant_ppl(scheme: str, windows) -> float:
    model = load_model("bundled:smollm2-135m", dtype="float32")
    quantize_model(model, scheme)
    return perplexity(model, windows, progress=False)


def test_w8a8kv8_within_2_percent_and_w4_per_channel_hurts(fp_ppl, wiki_test_windows):
    fp, _ = fp_ppl
    w8 = _quant_ppl("w8a8kv8", wiki_test_windows)
    w4 = _quant_ppl("w4", wiki_test_windows)
    print(f"\nperplexity fp {fp:.3f} | w8a8kv8 {w8:.3f} ({w8 / fp - 1:+.2%}) | w4 per-channel RTN {w4:.3f}"
          f" ({w4 / fp - 1:+.2%})")
    assert abs(w8 / fp - 1) < 0.02
    assert w4 > 1.3 * fp, "4-bit per-channel RTN is known to hurt this model a lot"
    assert torch.isfinite(torch.tensor(w4))

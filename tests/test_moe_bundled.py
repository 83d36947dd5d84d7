"""The bundled model as a mixture of experts (bundled:smollm2-135m-moe, qat/io/moe.py): with every expert active
it is the dense model; the shipped top-k model loads by name and uses every expert; a split that does not fit is
refused with the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import qat.io.models as models
from qat.io.models import DERIVED, load_model, load_tokenizer, resolve_model_path
from qat.io.moe import MoEError, MoESplit, build_moe, mixtral_config, split_mlp
from qat.keys import COMPLETE_MARKER

SHIPPED = "bundled:smollm2-135m-moe"
TEXT = ("The river rises in the hills north of the town and runs south through farmland, where a stone bridge "
        "built in 1820 still carries the old road. Its water powered three mills until the railway came.")


def tiny_split_block(split: MoESplit, seed: int = 0):
    """(a random Llama MLP, the Mixtral sparse block split from it, fresh inputs): hidden 64, 256 neurons."""
    torch.manual_seed(seed)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    dense = tf.models.llama.modeling_llama.LlamaMLP(config).eval()
    block = tf.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(mixtral_config(config, split)).eval()
    block.load_state_dict(split_mlp(dense, torch.randn(512, 64), split))
    return dense, block, torch.randn(2, 40, 64)


@pytest.mark.parametrize("method", ["coactivation", "gate-kmeans"])
def test_a_split_mlp_with_every_expert_active_is_the_dense_mlp(method):
    dense, block, x = tiny_split_block(MoESplit(experts=8, top_k=8, method=method))
    with torch.no_grad():
        want, got = dense(x), block(x)
    # The router's logits differ by ~spread (1e-5): every expert weighs 1 + O(1e-5), the rest is float rounding.
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_with_top_k_the_block_sums_the_chosen_neuron_groups():
    split = MoESplit(experts=8, top_k=3)
    dense, block, x = tiny_split_block(split, seed=1)
    x = x.reshape(-1, 64)
    with torch.no_grad():
        got = block(x[None])[0]
        _, _, chosen = block.gate(x)
        act = F.silu(dense.gate_proj(x)) * dense.up_proj(x)
        # Each expert's rows are its neurons, found back in the dense gate projection.
        rows = (block.experts.gate_up_proj[:, :32, None, :] == dense.gate_proj.weight).all(-1).float().argmax(-1)
        keep = torch.zeros_like(act).scatter(1, rows[chosen].flatten(1), 1.0)
        want = dense.down_proj(act * keep)
    assert sorted(rows.flatten().tolist()) == list(range(256))  # every neuron in exactly one expert
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.slow
def test_the_bundled_moe_with_every_expert_active_computes_the_dense_logits(bundled_path, bundled_tokenizer,
                                                                           tmp_path):
    # A few calibration tokens keep it quick: with k = E the ranking is unused, so the text does not matter here.
    build_moe(bundled_path, tmp_path, MoESplit(top_k=8, sequences=2, length=16))
    moe, dense = load_model(tmp_path, dtype="float32"), load_model(bundled_path, dtype="float32")
    assert type(moe).__name__ == "MixtralForCausalLM"
    for key in ("rope_parameters", "rms_norm_eps", "tie_word_embeddings", "head_dim", "max_position_embeddings",
                "num_key_value_heads", "vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(moe.config, key) == getattr(dense.config, key), key
    assert moe.config.sliding_window is None and moe.lm_head.weight is moe.model.embed_tokens.weight
    ids = bundled_tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = dense(ids).logits, moe(ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.slow
def test_the_shipped_moe_loads_by_name_and_routes_to_every_expert(bundled_tokenizer):
    split = DERIVED[SHIPPED][1]
    assert split.top_k < split.experts
    model = load_model(SHIPPED, dtype="float32")  # built into the cache on first use (about a minute)
    c = model.config
    assert type(model).__name__ == "MixtralForCausalLM"
    assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size) == (split.experts, split.top_k, 1536 // 8)
    assert resolve_model_path(SHIPPED).name == "smollm2-135m-moe"
    tok = load_tokenizer(SHIPPED)
    assert tok.get_vocab() == bundled_tokenizer.get_vocab()
    counts = []
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda module, args, out: counts.append(torch.bincount(out[2].flatten(), minlength=8)))
        for layer in model.model.layers]
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    per_layer = torch.stack(counts)
    assert per_layer.shape == (30, 8) and (per_layer.sum(1) == split.top_k * ids.shape[1]).all()
    assert (per_layer > 0).all(), f"dead experts (layer, expert): {(per_layer == 0).nonzero().tolist()}"
    # Still a language model: the next token after "The river rises in the" is mostly predicted well.
    nll = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert nll < 5.0


def test_the_moe_folder_is_built_once_and_again_when_its_split_changes(tmp_path, monkeypatch):
    # A stand-in dense folder and builder: this is about the cache, not the weights.
    monkeypatch.setenv("DISTQAT_HOME", str(tmp_path))
    dense = tmp_path / "models" / "smollm2-135m"
    dense.mkdir(parents=True)
    (dense / "config.json").write_text("{}")
    (dense / COMPLETE_MARKER).write_text("converted\n")
    built = []

    def fake_build(src, out, split):
        built.append((src, split))
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "build_moe", fake_build)
    folder = models.bundled_model_path(SHIPPED)
    assert folder == tmp_path / "models" / "smollm2-135m-moe" and built == [(dense, DERIVED[SHIPPED][1])]
    assert models.bundled_model_path(SHIPPED) == folder and len(built) == 1  # cached
    monkeypatch.setitem(DERIVED, SHIPPED, ("bundled:smollm2-135m", MoESplit(top_k=4)))
    assert models.bundled_model_path(SHIPPED) == folder and built[-1][1].top_k == 4  # an older build is replaced
    assert '"top_k": 4' in (folder / COMPLETE_MARKER).read_text()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["smollm2-135m", "smollm2-135m-moe"]  # no temp


@pytest.mark.parametrize("split, fix", [
    (MoESplit(experts=7), "choose a number of experts that divides it (2, 3, 4, 6, 8, 12, 16,"),
    (MoESplit(experts=8, top_k=9), "top_k=9 must be between 1 and experts=8"),
    (MoESplit(method="random"), "method='random' is not one of"),
])
def test_a_split_that_does_not_fit_is_refused_with_the_fix(split, fix, tmp_path):
    config = tf.LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    with pytest.raises(MoEError) as e:
        mixtral_config(config, split)
    assert fix in str(e.value)
    config.save_pretrained(tmp_path)  # and build_moe refuses it before loading any weights (the folder has none)
    with pytest.raises(MoEError) as e:
        build_moe(tmp_path, tmp_path / "out", split)
    assert fix in str(e.value) and not (tmp_path / "out").exists()

"""What makes true-sequential GPTQ's block loop cheaper changes no result: the Hessian from its upper blocks
(`qat/ptq/gram.py`), the attention output kept once q/k/v/o are rounded and the MLP's final pass from down_proj's
kept inputs (`qat/ptq/settled.py`)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import tiny_ids, tiny_llama
from transformers.models.llama import modeling_llama

import qat.ptq.loop as loop
from qat.online import turns_input
from qat.ptq import PTQConfig, run_ptq
from qat.ptq.config import RotateConfig
from qat.ptq.gram import MAX_CHUNKS, edges, gram
from qat.ptq.settled import BlockReuse
from qat.spec import QuantSpec, TensorSpec, parse


@pytest.mark.parametrize("width", [1, 63, 64, 191, 192, 193, 576, 1000, 1536, 4096, 14336])
def test_edges_cover_every_column_once(width):
    e = edges(width)
    assert e[0] == 0 and e[-1] == width and e == sorted(set(e))
    assert len(e) - 1 <= MAX_CHUNKS
    assert all(x % 64 == 0 for x in e[:-1])


@pytest.mark.parametrize("width", [50, 576, 700])
def test_gram_is_the_float64_product_and_symmetric(width):
    x = torch.randn(333, width, generator=torch.Generator().manual_seed(width))
    h = gram(x)
    ref = x.double().T @ x.double()
    assert torch.equal(h, h.T)
    assert (h.double() - ref).abs().max() <= 2e-6 * ref.abs().max()
    h64 = gram(x.double())
    assert (h64 - ref).abs().max() <= 1e-12 * ref.abs().max()


class NoReuse(BlockReuse):
    def rounded(self, names):
        pass


def _count(monkeypatch, cls, counts: dict, key: str) -> None:
    real = cls.forward

    def counting(self, *a, **k):
        counts[key] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(cls, "forward", counting)


def _gptq(monkeypatch, spec: QuantSpec, reuse: bool, layers: int = 3, batches: int = 3, method: str = "gptq",
          inter: int = 96, **cfg) -> tuple:
    torch.manual_seed(0)
    model = tiny_llama(inter=inter)
    model.model.layers.append(copy.deepcopy(model.model.layers[0]))  # 3 layers: a middle block too
    model.config.num_hidden_layers = layers
    monkeypatch.setattr(loop, "BlockReuse", BlockReuse if reuse else NoReuse)
    counts = {"attn": 0, "mlp": 0}
    _count(monkeypatch, modeling_llama.LlamaAttention, counts, "attn")
    _count(monkeypatch, modeling_llama.LlamaMLP, counts, "mlp")
    model, _ = run_ptq(model, spec, PTQConfig(method=method, batch_size=2, progress=False, **cfg),
                       tiny_ids(n=2 * batches, t=16))
    monkeypatch.undo()
    return model, counts


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    ids = tiny_ids(n=2, t=16, seed=5)
    assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("scheme", ["w4g16", "w4g16a8"])
def test_kept_outputs_give_the_same_model_with_fewer_passes(monkeypatch, scheme):
    spec = parse(scheme)
    plain, n_plain = _gptq(monkeypatch, spec, reuse=False)
    kept, n_kept = _gptq(monkeypatch, spec, reuse=True)
    _same(plain, kept)
    layers, batches = 3, 3
    # Per block the four groups' collects enter the attention (q/k/v's and o_proj's stop inside it) and the MLP
    # groups' enter the MLP, and (not after the last block) the pass for the next block's inputs runs both.
    assert n_plain == {"attn": batches * (4 * layers + layers - 1), "mlp": batches * (2 * layers + layers - 1)}
    # Kept from the gate/up collect on; the final pass's MLP is down_proj of the kept inputs (its own forward runs
    # once, on the first batch, as the check).
    assert n_kept == {"attn": batches * 3 * layers, "mlp": batches * 2 * layers + layers - 1}


def test_the_mlp_shortcut_keeps_the_input_down_proj_is_called_with(monkeypatch):
    """With R4 (an online Hadamard hooked in front of down_proj) the kept input is taken before the Hadamard, so the
    final pass's down_proj turns it once, as the MLP does."""
    spec = parse("w4g16")
    rot = dict(rotate=RotateConfig(online=["down"]))
    plain, n_plain = _gptq(monkeypatch, spec, reuse=False, method="rotate+gptq", inter=128, **rot)
    kept, n_kept = _gptq(monkeypatch, spec, reuse=True, method="rotate+gptq", inter=128, **rot)
    _same(plain, kept)
    assert turns_input(kept.model.layers[0].mlp.down_proj) is not None
    # The final passes' MLPs (3 batches after each of 2 blocks) are down_proj alone but for each block's check.
    assert n_plain["mlp"] - n_kept["mlp"] == 2 * 3 - 2


def test_static_activation_scales_are_calibrated_on_the_real_attention(monkeypatch):
    """GPTQ with static activation scales (which stay off until the block is rounded, then calibrate on it) gives
    the same model with and without the kept attention outputs."""
    spec = QuantSpec(weight=TensorSpec(bits=4, granularity="group", group_size=16),
                     activation=TensorSpec(bits=8, granularity="tensor", dynamic=False)).check()
    plain, _ = _gptq(monkeypatch, spec, reuse=False)
    kept, _ = _gptq(monkeypatch, spec, reuse=True)
    _same(plain, kept)
    scales = [v for k, v in kept.state_dict().items() if k.endswith("input_quantizer.scale")]
    assert len(scales) == 3 * 7 and all(bool((s > 0).all()) for s in scales)


def test_a_kept_output_of_another_shape_is_an_error_and_close_restores_forward():
    model = tiny_llama()
    layer = model.model.layers[0]
    x = torch.randn(1, 5, 64)
    pos = model.model.rotary_emb(x, torch.arange(5)[None])
    reuse = BlockReuse(layer, n_batches=1)
    reuse.rounded(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    assert not reuse.active
    reuse.rounded(["self_attn.o_proj"])
    assert reuse.active and "forward" in layer.self_attn.__dict__
    first = layer.self_attn(x, position_embeddings=pos, attention_mask=None)
    again = layer.self_attn(torch.zeros_like(x), position_embeddings=pos, attention_mask=None)
    assert again[0] is first[0]  # the kept output, whatever the input
    x6 = torch.randn(1, 6, 64)
    with pytest.raises(RuntimeError, match="calibration batch 0 has shape"):
        layer.self_attn(x6, position_embeddings=model.model.rotary_emb(x6, torch.arange(6)[None]),
                        attention_mask=None)
    reuse.close()
    assert "forward" not in layer.self_attn.__dict__
    fresh = layer.self_attn(torch.zeros_like(x), position_embeddings=pos, attention_mask=None)
    assert not torch.equal(fresh[0], first[0])


def test_an_mlp_that_is_not_down_of_its_kept_input_runs_itself():
    """The shortcut is checked on the first batch: an MLP that scales down_proj's output is run, every batch."""
    model = tiny_llama()
    layer = model.model.layers[0]
    reuse = BlockReuse(layer, n_batches=2)
    reuse.rounded(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"])
    handle = reuse.keep_down_inputs(["mlp.down_proj"])
    xs = [torch.randn(1, 4, 64), torch.randn(1, 4, 64)]
    real = [layer.mlp(x) for x in xs]
    handle.remove()
    assert len(reuse.down_in) == 2
    inner = layer.mlp.forward
    layer.mlp.forward = lambda x: 2 * inner(x)  # someone's MLP doing more after down_proj
    reuse.final_pass()
    assert torch.equal(layer.mlp(xs[0]), 2 * real[0]) and torch.equal(layer.mlp(xs[1]), 2 * real[1])
    assert "mlp" not in reuse.patches
    reuse.close()
    assert layer.mlp(xs[1]).equal(2 * real[1])  # the instance forward that was there before comes back


def test_down_inputs_that_would_not_fit_are_not_kept(monkeypatch):
    import qat.ptq.settled as settled

    monkeypatch.setattr(settled, "free_bytes", lambda device: 1000)
    layer = tiny_llama().model.layers[0]
    reuse = BlockReuse(layer, n_batches=2)
    reuse.rounded(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"])
    handle = reuse.keep_down_inputs(["mlp.down_proj"])
    layer.mlp(torch.randn(1, 4, 64))
    handle.remove()
    reuse.final_pass()
    assert reuse.down_in == [] and "mlp" not in reuse.patches


def test_a_layer_whose_mlp_has_another_name_keeps_only_the_attention():
    layer = tiny_llama().model.layers[0]
    layer.feed_forward = layer.mlp
    del layer.mlp
    reuse = BlockReuse(layer, n_batches=1)
    reuse.rounded(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"])
    assert reuse.active and reuse.keep_down_inputs(["mlp.down_proj"]) is None
    reuse.final_pass()
    assert list(reuse.patches) == ["attn"]
    reuse.close()

"""The two things that make true-sequential GPTQ's block loop cheaper change no result: the Hessian from its upper
blocks (`qat/ptq/gram.py`) and the attention output kept once q/k/v/o are rounded (`qat/ptq/settled.py`)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import tiny_ids, tiny_llama
from transformers.models.llama import modeling_llama

import qat.ptq.loop as loop
from qat.ptq import PTQConfig, run_ptq
from qat.ptq.gram import MAX_CHUNKS, edges, gram
from qat.ptq.settled import AttentionReuse
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


class NoReuse(AttentionReuse):
    def rounded(self, names):
        pass


def _count_attention(monkeypatch) -> list[int]:
    calls = [0]
    real = modeling_llama.LlamaAttention.forward

    def counting(self, *a, **k):
        calls[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", counting)
    return calls


def _gptq(monkeypatch, spec: QuantSpec, reuse: bool, layers: int = 3, batches: int = 3):
    torch.manual_seed(0)
    model = tiny_llama()
    model.model.layers.append(copy.deepcopy(model.model.layers[0]))  # 3 layers: a middle block too
    model.config.num_hidden_layers = layers
    monkeypatch.setattr(loop, "AttentionReuse", AttentionReuse if reuse else NoReuse)
    calls = _count_attention(monkeypatch)
    cfg = PTQConfig(method="gptq", batch_size=2, progress=False)
    model, _ = run_ptq(model, spec, cfg, tiny_ids(n=2 * batches, t=16))
    monkeypatch.undo()
    return model, calls[0]


@pytest.mark.parametrize("scheme", ["w4g16", "w4g16a8"])
def test_reused_attention_gives_the_same_model_with_fewer_passes(monkeypatch, scheme):
    spec = parse(scheme)
    plain, n_plain = _gptq(monkeypatch, spec, reuse=False)
    kept, n_kept = _gptq(monkeypatch, spec, reuse=True)
    for (name, a), (_, b) in zip(plain.state_dict().items(), kept.state_dict().items()):
        assert torch.equal(a, b), name
    layers, batches = 3, 3
    # Per block the four groups' collects enter the attention (q/k/v and o_proj's stop inside it), and (not after
    # the last block) the pass for the next block's inputs runs it.
    assert n_plain == batches * (4 * layers + layers - 1)
    # Kept from the gate/up collect on: with dynamic activation quantizers the final pass runs the attention again.
    assert n_kept == batches * (3 * layers + (layers - 1 if spec.activation is not None else 0))
    ids = tiny_ids(n=2, t=16, seed=5)
    assert torch.equal(plain(ids).logits, kept(ids).logits)


def test_static_activation_scales_are_calibrated_on_the_real_attention(monkeypatch):
    """GPTQ with static activation scales (which stay off until the block is rounded, then calibrate on it) gives
    the same model with and without the kept attention outputs."""
    spec = QuantSpec(weight=TensorSpec(bits=4, granularity="group", group_size=16),
                     activation=TensorSpec(bits=8, granularity="tensor", dynamic=False)).check()
    plain, _ = _gptq(monkeypatch, spec, reuse=False)
    kept, _ = _gptq(monkeypatch, spec, reuse=True)
    for (name, a), (_, b) in zip(plain.state_dict().items(), kept.state_dict().items()):
        assert torch.equal(a, b), name
    scales = [v for k, v in kept.state_dict().items() if k.endswith("input_quantizer.scale")]
    assert len(scales) == 3 * 7 and all(bool((s > 0).all()) for s in scales)


def test_a_kept_output_of_another_shape_is_an_error_and_close_restores_forward():
    model = tiny_llama()
    layer = model.model.layers[0]
    x = torch.randn(1, 5, 64)
    pos = model.model.rotary_emb(x, torch.arange(5)[None])
    reuse = AttentionReuse(layer, n_batches=1)
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

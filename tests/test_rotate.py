"""The rotation (ptq.method=rotate+...): Hadamard orders, exactness of the fold in float64 on each Llama-family
layout, what it does to outliers, its record, save/load/convert of a rotated PTQ folder, block-wise training
against a turned teacher, and the refusals."""

from __future__ import annotations

import pytest
import torch
from helpers.models import far_from_init, tiny_config
from torch import nn

from qat.export import convert_folder
from qat.load import inspect, load
from qat.ptq import PTQConfig, parse_method, run_ptq
from qat.ptq.blockwise import BlockwiseConfig, reconstruct
from qat.ptq.rotate import RotateConfig, hadamard, orthogonal, rotate_model, rotation_of
from qat.spec import parse

F64 = torch.float64


def ids(n=4, t=32, seed=0, vocab=128):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def model_of(family: str, tied: bool = False, dtype=F64, seed: int = 0) -> nn.Module:
    """A tiny model with norm weights and biases far from their init (so a fold that forgot them shows)."""
    cls, cfg = tiny_config(family)
    cfg.tie_word_embeddings = tied
    return far_from_init(cls, cfg, seed, biases=True).to(dtype)


@pytest.mark.parametrize("n", [2, 12, 20, 64, 72, 576, 896, 960])
def test_hadamard_orders_are_exact(n):
    h = hadamard(n)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=F64))


def test_an_order_without_a_construction_names_the_fix():
    with pytest.raises(ValueError, match="order 36.*ptq.rotate.kind=random"):
        hadamard(36)


@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotations_are_orthogonal_and_follow_the_seed(kind):
    a = orthogonal(576 if kind == "hadamard" else 96, kind, torch.Generator().manual_seed(3))
    b = orthogonal(a.shape[0], kind, torch.Generator().manual_seed(3))
    c = orthogonal(a.shape[0], kind, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0], dtype=F64), rtol=0, atol=1e-12)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_the_rotated_model_computes_the_same_function(family, tied, kind):
    """In float64 the turned model's logits equal the original's up to the float32 the RMSNorms compute in; the
    norms end at 1 and the head is untied from the embedding (the final norm's weight lives in the head)."""
    model = model_of(family, tied)
    x = ids(2, 24)
    with torch.no_grad():
        ref = model(x).logits
        embed_before = model.get_input_embeddings().weight.clone()
        record = rotate_model(model, RotateConfig(kind=kind, heads=True, seed=1))
        got = model(x).logits
    assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    assert not torch.allclose(model.get_input_embeddings().weight, embed_before)  # it did turn
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    assert record["kind"] == kind and record["seed"] == 1 and record["hidden"] == 64 and record["head_dim"] == 16


def test_a_rotated_tied_model_saves_and_loads_untied(tmp_path):
    from transformers import AutoModelForCausalLM

    model = model_of("llama", tied=True, dtype=torch.float32)
    x = ids(2, 16)
    with torch.no_grad():
        rotate_model(model, RotateConfig())
        out = model(x).logits
    model.save_pretrained(tmp_path / "r")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "r", dtype=torch.float32).eval()
    assert again.lm_head.weight.data_ptr() != again.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(again(x).logits, out)


def test_the_rotation_spreads_an_outlier_channel_and_quantizes_better():
    """A residual channel 30x the others (a norm weight) makes per-token int8 activations and int4 weight rows
    coarse; turned, the inputs of q/k/v lose the outlier and W4A8 RTN lands closer to the full-precision model."""
    model = model_of("llama", dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 30.0
            layer.post_attention_layernorm.weight[9] = 30.0
    x = ids(4, 32, seed=2)
    seen = {}

    def hook(_m, args):
        a = args[0].reshape(-1, args[0].shape[-1])
        seen["ratio"] = (a.abs().amax(1) / a.pow(2).mean(1).sqrt()).mean().item()

    with torch.no_grad():
        fp = model(x).logits
        base = _copy(model)
        h = base.model.layers[1].self_attn.q_proj.register_forward_pre_hook(hook)
        base(x)
        before = seen["ratio"]
        h.remove()
        turned = _copy(model)
        rotate_model(turned, RotateConfig())
        h = turned.model.layers[1].self_attn.q_proj.register_forward_pre_hook(hook)
        turned(x)
        after = seen["ratio"]
        h.remove()
        q_plain, _ = run_ptq(base, parse("w4a8"), PTQConfig(method="rtn", progress=False))
        q_turned, _ = run_ptq(model, parse("w4a8"), PTQConfig(method="rotate+rtn", progress=False))
        err_plain = (q_plain(x).logits - fp).pow(2).mean().item()
        err_turned = (q_turned(x).logits - fp).pow(2).mean().item()
    assert after < 0.5 * before, (before, after)
    # 0.67x on the signed weight grid (the default), under 0.5x on the full range: the signed grid already takes
    # part of the outlier rows' weight error away.
    assert err_turned < 0.75 * err_plain, (err_plain, err_turned)


def test_method_strings_put_the_rotation_first():
    assert parse_method("rotate+gptq") == ["rotate", "gptq"]
    assert parse_method("gptq+rotate") == ["rotate", "gptq"]
    assert parse_method("rotate") == ["rotate", "rtn"]
    assert parse_method("smoothquant+rotate+gptq") == ["rotate", "smoothquant", "gptq"]
    with pytest.raises(ValueError, match="llm_int8 is a baseline of its own"):
        parse_method("rotate+llm_int8")


def test_a_rotated_ptq_folder_records_the_turn_reloads_and_converts(tmp_path):
    """rotate+gptq: the folder's PTQ record names the rotation; it reloads bit-equal and converts to integer weights
    that compute the same model (the untied head stays float)."""
    model = model_of("llama", dtype=torch.float32)
    x = ids(2, 16, seed=1)
    q, report = run_ptq(model, parse("w4g16"), PTQConfig(method="rotate+gptq", progress=False, batch_size=2), ids())
    out = q(x).logits
    assert report.method == "rotate+gptq" and report.extra["rotate"]["kind"] == "hadamard"
    q.save_pretrained(tmp_path / "q")
    folder = inspect(tmp_path / "q")
    assert folder.record["method"] == "rotate+gptq"
    assert rotation_of(folder.config) == RotateConfig()
    again = load(tmp_path / "q")
    assert torch.equal(again(x).logits, out)
    rt = load(convert_folder(tmp_path / "q", tmp_path / "int"))
    torch.testing.assert_close(rt(x).logits, out, rtol=1e-5, atol=1e-5)


def test_blockwise_compares_a_rotated_start_with_the_teacher_turned_the_same_way():
    """Block-wise reconstruction of a rotate+rtn start: against the teacher turned by the start's record each block
    starts at its (small) quantization error and none gets worse; against the unturned teacher the blocks would be
    compared in two different bases (an error of the order of the signal)."""
    teacher = model_of("llama", dtype=torch.float32)
    student = model_of("llama", dtype=torch.float32)
    student, _ = run_ptq(student, parse("w4a8kv8"), PTQConfig(method="rotate+rtn", progress=False))
    x = ids(10, 32, seed=5)
    cfg = BlockwiseConfig(steps=20, lr=1e-4, quantizer_lr=1e-4, batch_size=2, held_out=2)
    plain_teacher = model_of("llama", dtype=torch.float32)
    wrong = reconstruct(_copy(student), plain_teacher, x, cfg, seed=0)
    rotate_model(teacher, rotation_of(student.config))
    right = reconstruct(student, teacher, x, cfg, seed=0)
    assert all(b.before < 0.2 * w.before for b, w in zip(right.blocks, wrong.blocks))
    assert all(b.after <= b.before for b in right.blocks)
    assert sum(b.after for b in right.blocks) < 0.97 * sum(b.before for b in right.blocks)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_layouts_the_fold_does_not_describe_are_refused():
    with pytest.raises(ValueError, match="gemma's RMSNorm computes"):
        rotate_model(model_of("gemma"), RotateConfig())

    class MeanNorm(nn.Module):  # named like an RMSNorm but subtracts the mean: not rotation-invariant
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n, dtype=F64))

        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    MeanNorm.__name__ = "FakeRMSNorm"
    model = model_of("llama")
    model.model.norm = MeanNorm(64)
    with pytest.raises(ValueError, match="not the same function"):
        rotate_model(model, RotateConfig())
    model = model_of("llama")
    model.model.layers[0].input_layernorm = nn.LayerNorm(64).to(F64)
    with pytest.raises(ValueError, match="model.layers.0.input_layernorm is LayerNorm, not a bias-free RMSNorm"):
        rotate_model(model, RotateConfig())

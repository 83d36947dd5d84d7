"""Online rotations (qat.online, qat.hadamard): R4 on down_proj inputs, R3 on queries and keys after RoPE."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from helpers.models import far_from_init, tiny_config
from helpers.quant_ref import assert_int_matches_ref, ref_codes, ref_dequant, ref_minmax
from torch import nn
from transformers import DynamicCache

from qat import online
from qat.export import convert_folder, convert_model
from qat.hadamard import Rotation, block_hadamard, hadamard
from qat.io.models import cache_kwarg
from qat.keys import INIT_KEY, PTQ_KEY, ROTATE_KEY
from qat.linear import QuantLinear
from qat.load import inspect, load
from qat.ptq import PTQConfig, run_ptq
from qat.ptq.rotate import Rotate, RotateConfig, rotate_model, rotation_of
from qat.runtime.kv_cache import IntKVCache
from qat.spec import parse

F64 = torch.float64


def ids(n=2, t=12, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _norm64(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))


def model_of(family: str, dtype=F64, seed: int = 0) -> nn.Module:
    """A tiny model with norm weights far from 1. In float64 its RMSNorms compute in float64 too: transformers' own
    cast to float32 would bound every float64 comparison at ~1e-8."""
    if family == "qwen3":
        cls, cfg = tf.Qwen3ForCausalLM, tf.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2, head_dim=16)
    else:
        cls, cfg = tiny_config(family)
    model = far_from_init(cls, cfg, seed).to(dtype)
    if dtype == F64:
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.forward = _norm64.__get__(m)
    return model


@pytest.mark.parametrize("n,block", [(1536, 0), (576, 0), (64, 0), (96, 0), (1536, 128), (1536, 12), (1536, 384),
                                     (576, 64)])
def test_hadamard_and_block_hadamard_are_orthogonal(n, block):
    r = Rotation(n, block)
    m = r.matrix()
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=F64), rtol=0, atol=1e-12)
    b = block or n
    torch.testing.assert_close(m, torch.kron(torch.eye(n // b, dtype=F64), hadamard(b) / b**0.5), rtol=0, atol=1e-15)
    assert torch.equal(block_hadamard(n, block), m)
    x = torch.randn(3, 5, n, dtype=F64, generator=torch.Generator().manual_seed(n + block))
    torch.testing.assert_close(r(x), x @ m, rtol=0, atol=1e-12)  # factor by factor = the dense matrix
    assert r(x.float()).dtype == torch.float32 and r(x.bfloat16()).dtype == torch.bfloat16


def test_orders_without_a_hadamard_name_the_fix():
    with pytest.raises(ValueError, match=r"online_block=7: a block must divide the width 1536; set "
                                         r"ptq.rotate.online_block to a block size with one \(.*1536\)"):
        Rotation(1536, 7)
    with pytest.raises(ValueError, match=r"no Hadamard matrix of order 36 .*\(1, 2, 4, 12\)"):
        Rotation(36)
    with pytest.raises(ValueError, match="online_block=5"):
        rotate_model(model_of("llama"), RotateConfig(online=["down"], online_block=5))
    with pytest.raises(ValueError, match=r"'up' is not an online rotation; use a subset of \['down', 'qk'\]"):
        Rotate(RotateConfig(online=["up"])).check(parse("w4a4kv4"))


@pytest.mark.parametrize("family,block", [("llama", 0), ("llama", 8), ("qwen3", 0), ("qwen3", 12)])
def test_online_rotations_leave_the_function_unchanged_in_float64(family, block):
    """R1+R2 folded, R4 folded into down_proj and turned online, R3 on q/k: the same logits to float64 rounding."""
    ref_model = model_of(family)
    x = ids()
    ref = ref_model(x).logits
    model = model_of(family)
    plain = model_of(family)
    rotate_model(plain, RotateConfig())
    rec = rotate_model(model, RotateConfig(online=["down", "qk"], online_block=block))
    assert rec["online"] == ["down", "qk"] and rec["online_block"] == block
    got = model(x).logits
    assert (got - ref).abs().max() <= 1e-10 * ref.abs().max()
    # R4 is really there: the down_proj weights differ from the plain rotation's by H, and without the hook the
    # logits are wrong.
    down = model.model.layers[0].mlp.down_proj
    h = online.turns_input(down)
    assert h is not None and h.key() == (96, block or 96)
    torch.testing.assert_close(down.weight, plain.model.layers[0].mlp.down_proj.weight @ h.matrix(), rtol=0,
                               atol=1e-12)
    assert online.key_rotation(model).key() == (16, 16)
    assert online.install(model, ["down", "qk"], block) == []  # idempotent: nothing new
    assert len(down._forward_pre_hooks) == 1
    down._forward_pre_hooks.clear()
    assert (model(x).logits - ref).abs().max() > 1e-3 * ref.abs().max()


def test_r3_alone_is_an_exact_no_op_without_a_quantized_cache():
    model = model_of("llama")
    x = ids()
    ref = model(x).logits
    assert len(online.install(model, ["qk"])) == 2
    assert model.config._attn_implementation.startswith("distqat_kv_")
    assert (model(x).logits - ref).abs().max() <= 1e-12 * ref.abs().max()


def _act_case():
    """A down_proj-like QuantLinear (int4 per-token asymmetric input, int4 channel weights) reading x H."""
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(96, 32, bias=False).to(F64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 96, generator=g, dtype=F64))
    q = QuantLinear.from_linear(lin, parse("w4a4").weight, parse("w4a4").activation)
    rot = Rotation(96, 0)
    q.register_forward_pre_hook(online.InputRotation(rot), prepend=True)
    x = torch.randn(4, 7, 96, generator=g, dtype=F64)
    x[..., 5] *= 30  # an outlier channel
    return q, rot, x


def test_the_input_quantizer_sees_the_turned_activation():
    q, rot, x = _act_case()
    seen = {}
    q.input_quantizer.register_forward_hook(lambda m, a, out: seen.update(inp=a[0], out=out))
    y = q(x)
    xh = x @ rot.matrix()
    torch.testing.assert_close(seen["inp"], xh, rtol=0, atol=1e-12)
    rows = xh.reshape(-1, 96)
    s, z = ref_minmax(rows, 4, False)
    assert_int_matches_ref(seen["out"].reshape(-1, 96), rows, s, z, 4, False)  # the float64 reference of Q(x H)
    xq = seen["out"]
    torch.testing.assert_close(y, xq @ q.quantized_weight().T, rtol=0, atol=1e-12)
    # What the turn buys: the outlier spread over every channel, the input's 4-bit error drops (H undone for the
    # comparison: x W^T = (x H)(W H)^T).
    s0, z0 = ref_minmax(x.reshape(-1, 96), 4, False)
    plain = ref_dequant(ref_codes(x.reshape(-1, 96), s0, z0, 4, False), s0, z0)
    assert (xq @ rot.matrix().T - x).norm() < 0.5 * (plain.reshape(x.shape) - x).norm()


def test_gradients_flow_through_the_rotation():
    """STE: d/dx of Q(x H) Wq^T is (g Wq) H^T, d/dW is g^T Q(x H) (minmax quantizers pass the gradient as is)."""
    q, rot, x = _act_case()
    x.requires_grad_(True)
    seen = {}
    q.input_quantizer.register_forward_hook(lambda m, a, out: seen.update(out=out.detach()))
    g = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(4), dtype=F64)
    (q(x) * g).sum().backward()
    wq = q.quantized_weight().detach()
    torch.testing.assert_close(x.grad, (g @ wq) @ rot.matrix().T, rtol=0, atol=1e-10)
    torch.testing.assert_close(q.weight.grad, g.reshape(-1, 32).T @ seen["out"].reshape(-1, 96), rtol=0, atol=1e-10)


def test_records_without_online_rotations_still_read():
    old = {PTQ_KEY: {"method": "rotate+gptq", ROTATE_KEY: {"kind": "hadamard", "heads": True, "seed": 0}}}
    assert rotation_of(old) == RotateConfig() and online.online_of(old) is None
    new = {INIT_KEY: {"from": "ptq", ROTATE_KEY: {"kind": "hadamard", "heads": True, "seed": 0, "online": ["qk"],
                                                  "online_block": 0}}}
    assert rotation_of(new) == RotateConfig(online=["qk"]) and online.online_of(new) == online.OnlineSpec(("qk",))


def test_fused_experts_refuse_r4_in_one_line():
    cfg = tf.Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2)
    model = tf.Qwen3MoeForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp holds fused MoE experts.*drop down from "
                                         r"ptq.rotate.online"):
        rotate_model(model, RotateConfig(online=["down"]))


@pytest.fixture(scope="module")
def rotated_folders(tmp_path_factory):
    """rotate+rtn with R4 and R3 at w4g32kv4 (fp32): the model, its PTQ folder, its converted folder. Weight-only
    integer layers compute bit for bit what fake quant does, so every number below compares exactly."""
    root = tmp_path_factory.mktemp("online")
    model = model_of("llama", dtype=torch.float32)
    cfg = PTQConfig(method="rotate+rtn", progress=False, rotate=RotateConfig(online=["down", "qk"]))
    q, _ = run_ptq(model, parse("w4g32kv4"), cfg)
    q.save_pretrained(root / "q")
    return q, root / "q", convert_folder(root / "q", root / "int", dtype=torch.float32)


def test_a_saved_rotated_folder_reinstalls_its_online_rotations(rotated_folders):
    q, path, _ = rotated_folders
    assert isinstance(q.model.layers[1].mlp.down_proj, QuantLinear)  # the hook survived quantize_model's swap
    assert online.turns_input(q.model.layers[1].mlp.down_proj) is not None
    assert rotation_of(inspect(path).config).online == ["down", "qk"]
    again = load(path, torch.float32)
    assert all(online.turns_input(layer.mlp.down_proj) is not None for layer in again.model.layers)
    assert online.key_rotation(again) is not None
    with torch.no_grad():
        assert torch.equal(again(ids()).logits, q(ids()).logits)


def test_convert_then_load_runs_the_online_rotations(rotated_folders):
    q, _, out = rotated_folders
    assert rotation_of(inspect(out).config).online == ["down", "qk"]
    assert "online rotations: R4" in (out / "README.md").read_text()
    rt = load(out, torch.float32)
    assert online.turns_input(rt.model.layers[0].mlp.down_proj) is not None
    x = ids(seed=2)
    with torch.no_grad():
        ref = q(x).logits
        assert torch.equal(rt(x).logits, ref)
        rt.model.layers[0].mlp.down_proj._forward_pre_hooks.clear()
        assert (rt(x).logits - ref).abs().max() > 1e-2 * ref.abs().max()


def test_the_int_kv_cache_stores_turned_keys_and_generates_as_fake_quant(rotated_folders):
    q, _, out = rotated_folders
    rt = load(out, torch.float32)
    x = ids(n=3, t=8, seed=4)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    arg = cache_kwarg(q)
    ref = q.generate(x, **{arg: DynamicCache()}, **kw)
    assert torch.equal(rt.generate(x, **kw), ref)  # the default cache: integer, keys turned by R3
    with pytest.raises(RuntimeError, match="key_rotation=qat.online.key_rotation"):
        rt.generate(x, **{arg: IntKVCache(rt.kv_spec, 2)}, **kw)
    cache = IntKVCache(rt.kv_spec, 2, key_rotation=online.key_rotation(rt))
    assert torch.equal(rt.generate(x, **{arg: cache}, **kw), ref)


def test_int8_activations_read_the_turned_input_after_convert(tmp_path):
    """w4g32a8: the converted IntLinear quantizes x H per token as the QuantLinear did (the same input gives the
    same output to fp32 accumulation order), and the whole model follows to rounding."""
    model = model_of("llama", dtype=torch.float32)
    cfg = PTQConfig(method="rotate+rtn", progress=False, rotate=RotateConfig(online=["down"]))
    q, _ = run_ptq(model, parse("w4g32a8"), cfg)
    rt = load(convert_model(q, tmp_path / "int"), torch.float32)
    a = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = q.model.layers[1].mlp.down_proj(a)
        got = rt.model.layers[1].mlp.down_proj(a)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
        x = ids(seed=3)
        ref, out = q(x).logits, rt(x).logits
    assert (out - ref).abs().max() <= 2e-3 * ref.abs().max()  # an int8 step flipped by accumulation order at most

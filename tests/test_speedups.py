"""qat.fast's speed-ups against the reference path: the same logits and the same gradient of every trainable
parameter, bit for bit (torch.equal) wherever the maths is the same; within rounding only for the Triton
norm kernel, whose sum of squares runs in another order. The kernel runs here in the Triton interpreter, in the
device lane (`TRITON_INTERPRET=1 pytest -m lane`: TRITON_INTERPRET must be set before triton is imported).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import PUBLISHED, lane_only
from helpers.models import tiny_config
from torch import nn

import qat.fast as fast
import qat.quantizers as quantizers
from qat.apply import quantize_model
from qat.kv import fake_quant_kv
from qat.linear import QuantLinear
from qat.quantizers import ActQuantizer
from qat.spec import TensorSpec, parse

VARIANTS = [[name] for name in fast.SPEEDUPS] + [list(fast.SPEEDUPS)]


def tiny(scheme: str = "w4a8kv8", family: str = "llama", dtype=torch.float32, ckpt: bool = False, **kw):
    cls, cfg = tiny_config(family)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).to(dtype)
    quantize_model(model, scheme, **kw)
    if ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return model


def step(model: nn.Module, seed: int = 0, autocast: bool = False):
    """(logits, {name: gradient}) of one forward and backward."""
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)
    for p in model.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids).logits
        (logits.float() ** 2).mean().backward()
    return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same(got, ref) -> None:
    (logits, grads), (ref_logits, ref_grads) = got, ref
    assert torch.equal(logits, ref_logits), (logits - ref_logits).abs().max()
    assert grads.keys() == ref_grads.keys()
    assert not [k for k in grads if not torch.equal(grads[k], ref_grads[k])]


@pytest.mark.parametrize("names", VARIANTS, ids="+".join)
@pytest.mark.parametrize("scheme", ["w4a8kv8", "w4g32a8kv8", "w8a8symkv8"])
def test_each_variant_gives_the_reference_logits_and_gradients(names, scheme):
    for dtype in (torch.float32, torch.bfloat16):
        ref = step(tiny(scheme, dtype=dtype))
        model = tiny(scheme, dtype=dtype)
        lines = fast.enable(model, names)
        assert len(lines) >= len(names) and all(line.split(":")[0] in names for line in lines)
        assert_same(step(model), ref)
        assert_same(step(model, seed=1), step(tiny(scheme, dtype=dtype), seed=1))  # a second forward: fresh


@pytest.mark.parametrize("names", [["weight_batch"], list(fast.SPEEDUPS)], ids="+".join)
def test_under_gradient_checkpointing_and_autocast(names):
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny(dtype=dtype, ckpt=True)
        fast.enable(model, names)
        assert_same(step(model), step(tiny(dtype=dtype, ckpt=True)))
    model = tiny()
    fast.enable(model, names)
    assert_same(step(model, autocast=True), step(tiny(), autocast=True))


def test_three_optimizer_steps_land_on_the_same_weights():
    models = [tiny(ckpt=True), tiny(ckpt=True)]
    fast.enable(models[0], fast.SPEEDUPS)
    for model in models:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for seed in range(3):
            step(model, seed)
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(*[m.state_dict().values() for m in models]))


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma", "gemma3"])
def test_other_families(family):
    model = tiny(family=family)
    lines = fast.enable(model, fast.SPEEDUPS)
    fused = sum(isinstance(m, fast.FakeQuantRMSNorm) for m in model.modules())
    if family.startswith("gemma"):  # 1 + weight: not LlamaRMSNorm's numbers, left alone
        assert fused == 0 and any("does not compute LlamaRMSNorm" in line for line in lines)
    else:
        assert fused == 4
    assert_same(step(model), step(tiny(family=family)))


def count_input_quantizers(model: nn.Module) -> list[str]:
    calls: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.input_quantizer is not None:
            m.input_quantizer.register_forward_hook(lambda *a, n=name: calls.append(n.rsplit(".", 1)[-1]))
    return calls


def test_norm_quant_readers_do_not_quantize_again():
    model = tiny()
    fast.enable(model, ["norm_quant"])
    calls = count_input_quantizers(model)
    step(model)
    assert calls == ["o_proj", "down_proj"] * 2  # q/k/v and gate/up take the norm's quantized output
    assert fast.FakeQuantRMSNorm in {type(m) for m in model.modules()}
    fast.disable(model)
    calls.clear()
    step(model)
    assert sorted(set(calls)) == ["down_proj", "gate_proj", "o_proj", "q_proj"]  # the SharedInput memo again
    assert not any(isinstance(m, fast.FakeQuantRMSNorm) for m in model.modules())


@pytest.mark.parametrize("kw,why", [
    (dict(overrides={"*.k_proj": "w4"}), "do not all quantize their input"),  # k_proj reads unquantized
    (dict(overrides={"*.up_proj": "w4a8sym"}), "not one dynamic per-token"),  # gate and up differ
])
def test_norm_quant_leaves_norms_alone_whose_readers_disagree(kw, why):
    model = tiny(**kw)
    lines = fast.enable(model, ["norm_quant"])
    assert any(why in line and "2 norm(s) left alone" in line for line in lines), lines
    assert sum(isinstance(m, fast.FakeQuantRMSNorm) for m in model.modules()) == 2
    assert_same(step(model), step(tiny(**kw)))


def test_norm_quant_without_a_memo_is_the_plain_norm():
    models = [tiny(), tiny()]
    fast.enable(models[0], ["norm_quant"])
    for model in models:
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.input_quantizer.shared = None  # each reader quantizes on its own
    assert_same(step(models[0]), step(models[1]))


def test_norm_quant_state_dict_is_the_models():
    model = tiny()
    before = model.state_dict()
    fast.enable(model, ["norm_quant"])
    after = model.state_dict()
    assert before.keys() == after.keys() and all(before[k] is after[k] or torch.equal(before[k], after[k])
                                                 for k in before)


def test_weight_batch_quantizes_each_group_in_one_call_and_keeps_nothing(monkeypatch):
    shapes: list[tuple[int, ...]] = []
    reference = quantizers.fake_quant
    monkeypatch.setattr(quantizers, "fake_quant", lambda rows, *a, **k: shapes.append(tuple(rows.shape))
                        or reference(rows, *a, **k))
    for scheme, weight_calls in (("w4a16", [(384, 64), (64, 96)]), ("w4g32a16", [(960, 32)])):
        model = tiny(scheme)
        fast.enable(model, ["weight_batch"])
        shapes.clear()
        step(model)
        # per channel q/k/v/o/gate/up share in_features=64 (384 rows) and down_proj stands alone; g32: all 7
        assert shapes == weight_calls * 2, (scheme, shapes)
        assert all(not m.__dict__.get("weight_batch", fast.WeightBatch([], None)).ready for m in model.modules())
    model = tiny("w4g32a16", ckpt=True)
    fast.enable(model, ["weight_batch"])
    shapes.clear()
    step(model)
    assert shapes == [(960, 32)] * 4  # the checkpoint's recompute batches too


def test_weight_batch_follows_weights_that_change_between_forwards():
    model, ref = tiny(), tiny()
    fast.enable(model, ["weight_batch"])
    for m in (model, ref):
        step(m)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1.5)  # in place, as an optimizer step
    assert_same(step(model), step(ref))
    with torch.no_grad():
        assert torch.equal(model(torch.arange(10)[None]).logits, ref(torch.arange(10)[None]).logits)


@pytest.mark.parametrize("granularity", ["token", "head"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_direct_is_the_reference_bit_for_bit(granularity, symmetric, dtype):
    g = torch.Generator().manual_seed(0)
    for bits in (8, 4):
        q = ActQuantizer(TensorSpec(bits=bits, symmetric=symmetric, granularity=granularity))
        base = torch.randn(2, 7, 3, 16, generator=g) * 2
        base[0, 1] = 0  # an all-zero token
        base[1, :, 2, ::5] *= 40
        # as attention gets it during training (a transposed view), and contiguous (a cache)
        for x0 in (base.transpose(1, 2), base.transpose(1, 2).contiguous()):
            x0 = x0.to(dtype)
            outs = []
            for direct in (False, True):
                x = x0.clone().requires_grad_(True)
                if direct:
                    q.fast_kv = fast.kv_direct
                y = fake_quant_kv(q, x)
                q.__dict__.pop("fast_kv", None)
                y.backward(torch.arange(y.numel(), dtype=dtype).reshape(y.shape) / 7)
                outs.append((y.detach(), x.grad))
            assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_kv_direct_leaves_other_specs_to_the_reference():
    x = torch.randn(1, 2, 3, 4)
    for spec in (TensorSpec(bits=8, format="fp8", granularity="token"),
                 TensorSpec(bits=8, granularity="tensor", dynamic=False)):
        assert fast.kv_direct(ActQuantizer(spec), x) is None


def test_enable_disable_and_names():
    model = tiny()
    ref = step(tiny())
    lines = fast.enable(model, ["compile", *fast.SPEEDUPS])
    assert [line.split(":")[0] for line in lines] == ["norm_quant", "norm_quant", "weight_batch", "kv_direct"]
    again = fast.enable(model, fast.SPEEDUPS)  # nothing applied twice
    assert sum(isinstance(h, fast._ClearBatches) for m in model.modules() for h in m._forward_pre_hooks.values()) == 2
    assert any("fused already" in line for line in again)
    assert_same(step(model), ref)
    fast.disable(model)
    assert not any(isinstance(m, fast.FakeQuantRMSNorm) or "weight_batch" in m.__dict__ or "fast_kv" in m.__dict__
                   for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks_always_called for m in model.model.layers)
    assert_same(step(model), ref)
    with pytest.raises(ValueError, match=r"unknown speed-up 'fused'; known: compile, norm_quant, weight_batch"):
        fast.enable(model, ["norm_quant", "fused"])
    assert fast.enable(model, []) == []


def test_the_config_key_and_build_models(monkeypatch, capsys):
    import trainer.models
    from trainer.config import ConfigError, load_config

    assert load_config(PUBLISHED, []).train.speedups == []
    with pytest.raises(ConfigError, match=r"'fused' in train.speedups=\['kv_direct', 'fused'\].*allowed values: "
                                          r"compile, norm_quant, weight_batch, kv_direct"):
        load_config(PUBLISHED, ["train.speedups=[kv_direct,fused]"])
    with pytest.raises(ConfigError, match="apply to train.mode=qat"):
        load_config(PUBLISHED, ["train.mode=qlora", "train.speedups=[compile]"])
    monkeypatch.setattr(trainer.models, "load_model", lambda *a, **k: tiny_config("llama")[0](tiny_config("llama")[1]))
    cfg = load_config(PUBLISHED, ["quant.scheme=w4a8kv8", "train.teacher_topk=8",
                             "train.speedups=[norm_quant,kv_direct,compile]"])
    student, _, _ = trainer.models.build_models(cfg)
    assert sum(isinstance(m, fast.FakeQuantRMSNorm) for m in student.modules()) == 4
    assert not any("weight_batch" in m.__dict__ for m in student.modules())
    assert student._compiled_call_impl is not None  # compiled in place (not run here: see below)
    err = capsys.readouterr().err
    assert "speed-up norm_quant:" in err and "speed-up kv_direct:" in err and "speed-up compile:" in err
    cfg = load_config(PUBLISHED, ["quant.scheme=w4a8kv8", "train.teacher_topk=8"])
    student, _, _ = trainer.models.build_models(cfg)
    assert student._compiled_call_impl is None and capsys.readouterr().err == ""


def test_under_torch_compile_the_speedups_step_aside():
    """A whole tiny model takes ~35 s to compile on 2 cores: one norm and two readers stand in for it."""
    spec = parse("w4a8")
    model = tiny("w4a8")
    layer = model.model.layers[0]
    block = nn.ModuleDict(dict(norm=layer.input_layernorm, q=layer.self_attn.q_proj, k=layer.self_attn.k_proj))

    def run(m, x):
        h = m["norm"](x)
        return m["q"](h).sum() + m["k"](h).sum()

    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    ref = run(block, x)
    fast.enable(model, ["norm_quant", "weight_batch"])
    block["norm"] = layer.input_layernorm
    assert isinstance(block["norm"], fast.FakeQuantRMSNorm) and block["q"].weight_batch.spec == spec.weight
    compiled = torch.compile(run)
    out = compiled(block, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(run(block, x), ref)  # and eager again afterwards


# ---------------------------------------------------------------------------------------------
# The Triton norm kernel, in the interpreter.

def _check_kernel(device: str = "cpu") -> list[str]:
    from qat.kernels import fused_rms_norm_quant

    errors = []
    g = torch.Generator().manual_seed(0)
    cases = [(torch.float32, torch.float32, None), (torch.bfloat16, torch.bfloat16, None),
             (torch.bfloat16, torch.float32, None), (torch.float16, torch.float16, None),
             (torch.float32, torch.bfloat16, None), (torch.float32, torch.float32, torch.bfloat16)]
    for (xd, wd, od), (R, n) in zip(cases * 2, [(37, 100)] * 6 + [(5, 64), (1, 7), (70, 576)] * 2):
        x = torch.randn(R, n, generator=g) * 3
        x[min(1, R - 1)] = 0
        x[-1, ::7] *= 100
        x, w = x.to(device, xd), (torch.randn(n, generator=g) + 1).to(device, wd)
        y_ref, rstd_ref = fast.rms_norm(x, w, 1e-6)
        for bits, sym in ((8, False), (8, True), (4, True), (4, False)):
            out, rstd, y = fused_rms_norm_quant(x, w, 1e-6, bits, sym, od, store_y=True)
            spec = TensorSpec(bits=bits, symmetric=sym, granularity="token")
            own = quantizers.fake_quant(y if od is None else y.to(od), spec, use_kernel=False)
            where = f"{xd} {wd} {od} ({R}, {n}) bits={bits} sym={sym}"
            if not torch.equal(out, own):
                errors.append(f"{where}: quant of the kernel's own norm differs")
            tol = 1e-5 if y.dtype == torch.float32 else 1e-2
            if not torch.allclose(y.float(), y_ref.float(), rtol=tol, atol=tol * 1e-2):
                errors.append(f"{where}: norm differs by {(y.float() - y_ref.float()).abs().max()}")
            if not torch.allclose(rstd, rstd_ref.reshape(-1), rtol=1e-6):
                errors.append(f"{where}: rstd differs")
    return errors


def _check_model(monkeypatch) -> list[str]:
    import qat.kernels

    errors, used = [], []
    kernel = qat.kernels.fused_rms_norm_quant

    def counted(*a, **k):
        out = kernel(*a, **k)
        used.append(out is not None)
        return out

    monkeypatch.setattr(fast, "fused_rms_norm_quant", counted)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):  # seen: 2e-7 and 0
        model = tiny(dtype=dtype)
        fast.enable(model, ["norm_quant"])
        (logits, grads), (ref_logits, ref_grads) = step(model), step(tiny(dtype=dtype))
        scale = ref_logits.float().abs().max()
        if not (used and all(used)):
            errors.append(f"{dtype}: the kernel did not run")
        if (logits.float() - ref_logits.float()).abs().max() > tol * scale:
            errors.append(f"{dtype}: logits differ by {(logits.float() - ref_logits.float()).abs().max()}")
        for k in ref_grads:
            a, b = grads[k].float(), ref_grads[k].float()
            if (a - b).norm() > 10 * tol * b.norm():
                errors.append(f"{dtype}: gradient of {k} differs by {(a - b).norm() / b.norm():.2e} (relative)")
    return errors


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@lane_only
def test_triton_norm_kernel_in_the_interpreter():
    assert _check_kernel() == []


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@lane_only
def test_triton_norm_kernel_in_a_model_in_the_interpreter(monkeypatch):
    assert _check_model(monkeypatch) == []


@pytest.mark.cuda
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_norm_kernel_on_cuda():
    assert _check_kernel("cuda") == []
    model, ref = tiny().cuda(), tiny().cuda()
    fast.enable(model, ["norm_quant"])
    (logits, grads), (ref_logits, ref_grads) = step(model), step(ref)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4 * ref_logits.abs().max().item())
    for k in ref_grads:
        assert (grads[k] - ref_grads[k]).norm() <= 1e-3 * ref_grads[k].norm(), k


"""The packed QLoRA base and its peft adapters: exact against fake quant, small in memory, nothing
weight-sized kept for backward, only adapters train, gradients against the fake-quant reference,
gradient checkpointing, saving and reloading with peft."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.models import fake_and_packed, tiny_ids
from peft import LoraConfig, PeftModel, get_peft_model

from qat.linear import QuantLinear
from qat.qlora.adapters import add_adapters, load_adapters, save_adapters
from qat.qlora.base import fingerprint
from qat.qlora.config import LoRAConfig
from qat.quantizers import NF4_LEVELS, weight_rows
from qat.runtime.pack import pack_int32, unpack_int32
from qat.runtime.packed import PackedLinear, decode_packed, nf4_levels, weight_bytes_ratio
from qat.spec import parse
from trainer.models import enable_checkpointing

SCHEMES = ["w4g32", "w4g32asym", "w4", "w8g32asym", "w3g32", "w4a8", "wnf4g32"]


@pytest.mark.lane
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_base_computes_what_fake_quant_computes(scheme, dtype):
    fq, packed = fake_and_packed(scheme, dtype)
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    assert not any(isinstance(m, QuantLinear) for m in packed.modules())
    with torch.no_grad():
        a, b = fq(tiny_ids()).logits, packed(tiny_ids()).logits
    if "nf4" in scheme:  # the fake-quant STE expression ((level - y) + y) * s can differ by an fp32 ulp
        torch.testing.assert_close(b, a, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    else:
        assert torch.equal(a, b)


def test_nf4_double_quant_against_a_float64_reference():
    fq, packed = fake_and_packed("wnf4g32", torch.float32, double_quant=True)
    layer = packed.model.layers[0].mlp.down_proj
    src = fq.model.layers[0].mlp.down_proj.weight.detach().double()
    rows = weight_rows(src, layer.weight_spec)
    s = rows.abs().amax(-1)  # first-level scales, then int8 codes of (s - mean) per block of 256
    d = s - s.mean()
    blocks = torch.nn.functional.pad(d, (0, (-len(d)) % 256)).reshape(-1, 256)
    absmax = blocks.abs().amax(-1)
    q = (blocks / absmax[:, None] * 127).round().clamp(-127, 127)
    s2 = (q / 127 * absmax[:, None]).flatten()[: len(s)] + s.mean()
    levels = NF4_LEVELS.double()
    codes = (rows / s2[:, None]).unsqueeze(-1).sub(levels).abs().argmin(-1)
    ref = (levels[codes] * s2[:, None]).reshape(src.shape)
    got = layer.dequantized_weight(torch.float64)
    assert (got - ref).abs().max() < 1e-6 * ref.abs().max()
    assert layer.scale is None and layer.scale_codes.dtype == torch.int8


@pytest.mark.parametrize("scheme,limit", [("w4g64", 0.3), ("w4g32asym", 0.3), ("wnf4g64", 0.3), ("w4", 0.3)])
def test_packed_base_is_small(scheme, limit):
    _, packed = fake_and_packed(scheme, torch.bfloat16, double_quant="nf4" in scheme, hidden=128, inter=256)
    assert weight_bytes_ratio(packed) <= limit
    names = dict(packed.named_parameters())
    assert not [n for n in names if n.endswith("proj.weight")]  # no fp weight survived packing


def adapted(scheme="w4g32", dtype=torch.float32, **lora):
    _, packed = fake_and_packed(scheme, dtype)
    model = add_adapters(packed, LoRAConfig(**{"r": 4, "dropout": 0.0, **lora}))
    for n, p in model.named_parameters():  # a non-zero B, so the adapters change the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    return model


def test_backward_saves_no_weight_sized_tensor_per_frozen_linear():
    model = adapted()
    sizes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, PackedLinear)}
    numel = {a * b for a, b in sizes}
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tiny_ids(1, 8)).logits.float().pow(2).mean()
    loss.backward()
    assert saved, "the hooks saw nothing"
    weightlike = [s for s in saved if s in sizes or s[::-1] in sizes or (len(s) == 2 and s[0] * s[1] in numel)]
    assert weightlike == []


def test_only_adapters_train_and_the_base_stays_bit_identical():
    model = adapted()
    before = {n: t.clone() for n, t in model.named_buffers() if t is not None}
    print_base = fingerprint(model.base_model.model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        x = tiny_ids(seed=step)
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        opt.step()
    after = dict(model.named_buffers())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert fingerprint(model.base_model.model) == print_base


@pytest.mark.lane
def test_gradients_equal_the_fake_quant_reference():
    """LoRA on the packed base vs the same LoRA on the fake-quant model's plain dequantized linears."""
    fq, packed = fake_and_packed("w4g32asym")
    targets = [n for n, m in packed.named_modules() if isinstance(m, PackedLinear)]
    model = add_adapters(packed, LoRAConfig(r=4, dropout=0.0))
    ref = copy.deepcopy(fq)
    for name, m in list(ref.named_modules()):
        if isinstance(m, QuantLinear):  # frozen fake-quant weights as plain Linears: what peft adapts natively
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.quantized_weight().detach().clone()
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, lin)
    ref.requires_grad_(False)
    ref = get_peft_model(ref, LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    torch.manual_seed(3)
    mine = {n: p for n, p in model.named_parameters() if "lora_" in n}
    theirs = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    assert mine.keys() == theirs.keys()
    for n, p in mine.items():
        p.data.normal_(std=0.05)
        theirs[n].data.copy_(p.data)
    x = tiny_ids()
    for m in (model, ref):
        m(x).logits.float().pow(2).mean().backward()
    torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * len(targets)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    def grads(checkpointing):
        model = adapted()
        if checkpointing:
            enable_checkpointing(model.base_model.model, reentrant)
            model.enable_input_require_grads()  # the frozen base: inputs must carry grad through reentrant checkpoints
        model.train()
        model(tiny_ids()).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


def test_adapters_save_and_reload_with_peft(tmp_path):
    model = adapted()
    x = tiny_ids()
    with torch.no_grad():
        want = model(x).logits
    fp = fingerprint(model.base_model.model)
    save_adapters(model, tmp_path / "a", {"fingerprint": fp, "base": "tiny"})
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    _, base = fake_and_packed("w4g32")
    again = load_adapters(base, tmp_path / "a", fingerprint=fingerprint(base))
    with torch.no_grad():
        assert torch.equal(again(x).logits, want)
    # Plain peft loads it too: importing qat.qlora.adapters registered the packed layers with peft.
    _, bare = fake_and_packed("w4g32")
    plain = PeftModel.from_pretrained(bare, str(tmp_path / "a"))
    assert type(plain.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "PackedLoraLinear"
    with torch.no_grad():
        assert torch.equal(plain(x).logits, want)
    _, other = fake_and_packed("w4g32asym")
    with pytest.raises(ValueError, match="trained on another base"):
        load_adapters(other, tmp_path / "a", fingerprint=fingerprint(other))


def test_qalora_refusals_name_the_key():
    _, packed = fake_and_packed("w4")
    with pytest.raises(ValueError, match="lora.variant=qalora"):
        add_adapters(packed, LoRAConfig(variant="qalora"))
    _, packed = fake_and_packed("w4g32")
    with pytest.raises(ValueError, match=r"lora.r=16 .*set lora.r <= 2"):
        add_adapters(packed, LoRAConfig(variant="qalora", r=16))
    with pytest.raises(ValueError, match="lora.target_modules"):
        add_adapters(packed, LoRAConfig(target_modules=["*.nothing"]))


def test_the_base_comes_from_a_saved_fake_quant_folder_or_an_integer_checkpoint(tmp_path):
    from qat.export.convert import convert_model
    from qat.load import load
    from qat.qlora.base import build_base

    fq, _ = fake_and_packed("w4g32asym")
    fq.save_pretrained(tmp_path / "fq")
    convert_model(fq, tmp_path / "int")
    x = tiny_ids()
    for folder in ("fq", "int"):
        base, info = build_base(tmp_path / folder, None, dtype=None)
        assert info.kind.value == {"fq": "qat", "int": "int"}[folder]
        assert any(isinstance(m, PackedLinear) for m in base.modules())
        assert not any(p.requires_grad for p in base.parameters())
        with torch.no_grad():
            assert torch.equal(base(x).logits, load(tmp_path / folder)(x).logits), folder


@pytest.mark.lane
@pytest.mark.parametrize("scheme,variant", [("w4g32", "lora"), ("w4g32asym", "qalora"), ("w8g32asym", "lora"),
                                            ("w2g32", "lora")])
def test_a_step_on_the_packed_base_takes_the_runtime_dequantizer_on_the_device_path(scheme, variant, kernel_calls,
                                                                                    monkeypatch):
    """On the device path (a GPU; the Triton interpreter in the lane) the packed base dequantizes through the integer
    runtime's kernel, bit for bit the torch path's weight. Until this test a GPU run left that weight unassigned:
    UnboundLocalError at the first step of every int4 and QA-LoRA recipe."""
    from qat.device import device_path

    _, packed = fake_and_packed(scheme, torch.bfloat16)
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    on_device = device_path(layers[0].qweight, "int_linear")
    monkeypatch.setenv("DISTQAT_INT_KERNELS", "0")  # the torch path, the reference
    want = [m.dequantized_weight(torch.bfloat16) for m in layers]
    monkeypatch.delenv("DISTQAT_INT_KERNELS")
    got = [m.dequantized_weight(torch.bfloat16) for m in layers]
    assert kernel_calls["dequantize"] == (len(layers) if on_device else 0)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    m = layers[1]  # and the torch path against (code - zero) * scale in float64
    bits, g = m.bits, m.group_size
    u = unpack_int32(m.qweight, bits, m.in_features).long() if bits < 8 else m.qweight.long() + 128
    z = torch.full(m.scale.shape, 1 << (bits - 1)) if m.zero is None else m.zero.long() + (128 if bits == 8 else 0)
    ref = (u - z.repeat_interleave(g, 1)).double() * m.scale.double().repeat_interleave(g, 1)
    assert torch.equal(want[1], ref.to(torch.bfloat16))

    model = add_adapters(packed, LoRAConfig(r=2, dropout=0.0, variant=variant))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = kernel_calls["dequantize"]
    x = tiny_ids()
    loss = torch.nn.functional.cross_entropy(model(x).logits.float().flatten(0, 1), x.flatten())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    # each frozen linear dequantizes in forward, and again in backward where its input needs a gradient (not the
    # first layer's q/k/v, which read the frozen embedding): no weight is kept for backward
    assert kernel_calls["dequantize"] - before == (2 * len(layers) - 3 if on_device else 0)


@pytest.mark.parametrize("k", [64, 40, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nf4_levels_decode_each_packed_index_exactly(k, dtype):
    torch.manual_seed(k)
    codes = torch.randint(0, 16, (5, k), dtype=torch.int32)
    got = nf4_levels(pack_int32(codes, 4), k, dtype)
    assert got.dtype == dtype and torch.equal(got, NF4_LEVELS.to(dtype)[codes.long()])


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [64, 40, 7])
@pytest.mark.parametrize("kind", ["raw", "centered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_decode_packed_gives_each_code_exactly(bits, k, kind, dtype):
    """The 16-bit table lookup against the codes themselves (3 bits straddle bytes: the shift path), including
    widths that end inside a 16-bit chunk."""
    torch.manual_seed(bits * 100 + k)
    codes = torch.randint(0, 1 << bits, (6, k), dtype=torch.int32)
    got = decode_packed(pack_int32(codes, bits), bits, k, dtype, kind)
    want = (codes - (1 << (bits - 1)) if kind == "centered" else codes).to(dtype)
    assert got.shape == (6, k) and got.dtype == dtype and got.is_contiguous() and torch.equal(got, want)


@pytest.mark.parametrize("scheme", ["w4g32", "w4g32asym", "w2g32asym", "w8g32", "wnf4g32"])
def test_dequantized_tiles_equal_codes_times_scales_in_float64(scheme):
    """Every tile of the packed weight (forward's rows, backward's columns) is (code - zero) * scale, or the NF4
    level times the scale, rounded once from float64."""
    torch.manual_seed(1)
    q = QuantLinear(96, 40, bias=False, weight_spec=parse(scheme).weight)
    m = PackedLinear.from_quant_linear(q)
    codes, scale, zero = q.weight_quantizer.quantize(q.weight.detach())
    g = m.group_size
    levels = NF4_LEVELS.double()[codes.long()] if m.nf4 else codes.double() - (
        zero.double().repeat_interleave(g, 1) if zero is not None else 0)
    want = (levels * scale.double().repeat_interleave(g, 1)).float()
    torch.testing.assert_close(m.dequantized_weight(torch.float32), want, rtol=0, atol=0)
    assert torch.equal(m.dequantized_weight(torch.float32, rows=slice(8, 24)), want[8:24])
    assert torch.equal(m.dequantized_weight(torch.float32, cols=(32, 96)), want[:, 32:96])

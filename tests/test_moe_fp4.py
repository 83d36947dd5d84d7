"""FP4 (NVFP4, MXFP4) on fused MoE experts, and gpt-oss's own MXFP4 expert checkpoints as a QAT start.

- Tiny gpt-oss (transposed (E, in, out) storage, interleaved gate/up, biases, clamped swiglu), Qwen3-MoE and Mixtral
  at mxfp4 / nvfp4: every stacked expert weight gets an fp4 quantizer whose blocks run along the reduction (input)
  dimension of each expert, equal to a float64 reference; one training step gives a finite loss and straight-through
  gradients (zero where a value saturates at +-6) on the expert weights.
- A gpt-oss-style MXFP4 folder (`*_blocks`: two e2m1 nibbles a byte, low nibble first; `*_scales`: e8m0; the
  layout transformers' `convert_moe_packed_tensors` reads) loads dequantized through distqat's loader, and the
  student built from it at wmxfp4 (attention kept as the folder keeps it) holds the folder's expert weights bit for
  bit and computes the teacher's logits bit for bit: fake quant of MXFP4 values is lossless with our exponent rule.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import transformers as tf
from helpers import PUBLISHED
from helpers.moe import tiny_moe
from safetensors import safe_open
from safetensors.torch import save_file

from qat.apply import quantize_model
from qat.experts import QuantExperts
from qat.fp4 import fp4_codes, fp4_round, mxfp4_exponent, pow2
from qat.io.models import load_model
from qat.keys import COVERAGE_KEY, HF_QUANT_KEY, SOURCE_KEY
from qat.qlora.base import build_base
from qat.quantizers import WeightQuantizer
from qat.spec import SpecError, parse
from trainer.config import load_config
from trainer.models import build_models

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
# gpt-oss's own config keeps these out of MXFP4 (prefixes of module names)
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
KEEP = ["*.self_attn.*", "lm_head"]  # the same as quant.exclude (fnmatch over linears; routers stay fp anyway)


def ref_e2m1(y: float) -> float:
    """Nearest e2m1 value in float64, ties to the even mantissa, saturating at 6."""
    a = min(abs(y), 6.0)
    best = min(range(8), key=lambda i: (abs(E2M1[i] - a), i % 2))
    return math.copysign(E2M1[best], y)


def e4m3(v: float) -> float:
    return float(torch.tensor(min(v, 448.0), dtype=torch.float64).to(torch.float8_e4m3fn).double())


def ref_fp4_expert(w: torch.Tensor, fmt: str, global_chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 fake quant of one expert's (out, in) weight in blocks along `in`: (values, saturated mask). NVFP4's
    power-of-two tensor scale is taken over `global_chunk` (the weights that share it)."""
    block = 32 if fmt == "mxfp4" else 16
    rows = w.double().reshape(-1, block)
    amax = rows.abs().amax(-1).tolist()
    if fmt == "mxfp4":
        effs = []
        for a in amax:
            top = math.floor(math.log2(a))
            effs.append(2.0 ** (top + (a / 2.0**top >= 1.75) - 2))
    else:
        top = global_chunk.double().reshape(-1, block).abs().amax(-1).max().item() / 6.0
        k = max(j for j in range(-130, 130) if top * 2.0**j <= 448.0)
        effs = [max(e4m3(a / 6.0 * 2.0**k), 2.0**-9) / 2.0**k for a in amax]
    eff = torch.tensor(effs, dtype=torch.float64)[:, None]
    y = (rows.float() / eff.float()).double()  # the division as fp32 does it, the rounding in float64
    q = torch.tensor([[ref_e2m1(v) for v in r] for r in y.tolist()], dtype=torch.float64) * eff
    return q.reshape(w.shape), (y.abs() > 6.0).reshape(w.shape)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("scheme", ["mxfp4", "nvfp4"])
def test_fp4_experts_blocks_along_the_input_and_one_training_step(family, scheme):
    model = tiny_moe(family)
    report = quantize_model(model, parse(scheme))
    assert report.coverage.kinds["experts"][0] == report.coverage.kinds["experts"][1] > 0
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert experts and all(set(m.weight_quantizers) == {"gate_up_proj", "down_proj"} for m in experts)
    mod = experts[0]
    assert mod.expert_layout.transposed == (family == "gpt_oss")
    fmt = parse(scheme).weight.format
    gen = torch.Generator().manual_seed(3)
    for p in ("gate_up_proj", "down_proj"):
        assert mod.weight_quantizers[p].spec.format == fmt
        stored = getattr(mod, p)
        stacked = mod.canonical(p).detach()  # (E, out, in): gpt-oss's (E, in, out) transposed back
        assert stacked.shape[2] == (stored.shape[1] if family == "gpt_oss" else stored.shape[2])
        q = mod.quantized_weight(p)
        for e in range(stacked.shape[0]):
            want, saturated = ref_fp4_expert(stacked[e], fmt, stacked[e])
            assert torch.equal(q[e].double(), want), (p, e)
        # straight through: the upstream gradient reaches the stored weight unchanged, except at saturated values
        g = torch.randn(q.shape, generator=gen)
        stored.grad = None
        (q * g).sum().backward()
        masks = torch.stack([ref_fp4_expert(stacked[e], fmt, stacked[e])[1] for e in range(stacked.shape[0])])
        want_grad = torch.where(masks, torch.zeros_like(g), g)
        got = stored.grad.transpose(1, 2) if family == "gpt_oss" else stored.grad
        assert torch.equal(got == 0, want_grad == 0)
        # the gradient passes x / eff then * eff: exact for MXFP4's powers of two, within an ulp for NVFP4's scales
        torch.testing.assert_close(got, want_grad, rtol=0 if fmt == "mxfp4" else 2.0**-22, atol=0)
    model.zero_grad()
    ids = torch.randint(3, 100, (2, 16), generator=gen)
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for m in experts:
        for p in ("gate_up_proj", "down_proj"):
            grad = getattr(m, p).grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_of_mxfp4_values_is_lossless(dtype):
    """Every MXFP4 block (any largest magnitude, any exponent, all zeros) is a fixed point of mxfp4 fake quant: our
    exponent may differ from the stored one (a block whose largest value is 3 takes the next lower exponent) but
    the values are the same."""
    gen = torch.Generator().manual_seed(5)
    blocks = []
    for top in range(8):
        for exp in (-60, -9, -1, 0, 3, 40):
            idx = torch.randint(0, top + 1, (32,), generator=gen)
            idx[int(torch.randint(0, 32, (1,), generator=gen))] = top
            sign = torch.where(torch.rand(32, generator=gen) < 0.5, -1.0, 1.0)
            blocks.append(torch.tensor(E2M1)[idx] * sign * 2.0**exp)
    w = torch.stack(blocks).to(dtype)
    assert torch.equal(WeightQuantizer(parse("wmxfp4").weight, w)(w), w)


def pack_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's MXFP4 layout of a stacked expert weight held (E, in, out): blocks (E, out, in/32, 16) uint8, two
    e2m1 codes a byte (even element in the low nibble), scales (E, out, in/32) uint8 e8m0 (exponent + 127)."""
    c = w.detach().transpose(1, 2).float()
    e, o, i = c.shape
    rows = c.reshape(e, o, i // 32, 32)
    exp = mxfp4_exponent(rows.abs().amax(-1))
    codes = fp4_codes(fp4_round(rows / pow2(exp)[..., None]))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8), (exp + 127).to(torch.uint8)


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float64 decode of the layout above, back to (E, in, out): independent of transformers and of qat.fp4."""
    lut = torch.tensor(E2M1 + [-v for v in E2M1], dtype=torch.float64)
    codes = torch.stack([blocks & 15, blocks >> 4], -1).long().flatten(-2)  # (E, out, G, 32)
    vals = lut[codes] * torch.exp2(scales.double() - 127)[..., None]
    return vals.flatten(-2).transpose(1, 2)


@pytest.fixture(scope="module")
def mxfp4_folder(tmp_path_factory):
    """A tiny gpt-oss saved as gpt-oss ships: experts as `*_blocks`/`*_scales`, everything else as it is."""
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    model = tiny_moe("gpt_oss")
    with torch.no_grad():  # expert biases and weights of gpt-oss's scale, so routed tokens differ per expert
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.3 if name.endswith("bias") else 0.1)
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = pack_mxfp4(t)
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg[HF_QUANT_KEY] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_gpt_oss_mxfp4_checkpoint_is_exactly_the_qat_start(mxfp4_folder):
    with safe_open(str(mxfp4_folder / "model.safetensors"), "pt") as f:
        shipped = {k.removesuffix("_blocks"): decode_mxfp4(f.get_tensor(k), f.get_tensor(k[:-7] + "_scales"))
                   for k in f.keys() if k.endswith("_blocks")}
    # transformers' own reading of the folder, dequantized: the shipped expert weights, exactly
    theirs = tf.AutoModelForCausalLM.from_pretrained(
        mxfp4_folder, dtype=torch.float32, quantization_config=tf.Mxfp4Config(dequantize=True)).eval()
    for name, want in shipped.items():
        assert torch.equal(theirs.get_parameter(name).double(), want), name
    # the QAT student as `distqat train` builds it (train.init=rtn): weights only, attention as the folder keeps it
    exclude = json.dumps(KEEP)
    # gpt-oss's attention sinks have no sdpa path in transformers: eager, as its own model card says
    cfg = load_config(PUBLISHED, [f"model.name_or_path={mxfp4_folder}", "quant.scheme=wmxfp4",
                                  f"quant.exclude={exclude}", "model.attn_implementation=eager"])
    student, teacher, report = build_models(cfg)
    assert "source: the model's experts came in MXFP4" in str(report)
    assert getattr(student.config, COVERAGE_KEY)["source"]["format"] == "mxfp4"
    assert getattr(student.config, SOURCE_KEY)["weights"] == "experts"
    assert getattr(student.config, HF_QUANT_KEY, None) is None  # dequantized: a saved student is a plain QAT folder
    experts = {n: m for n, m in student.named_modules() if isinstance(m, QuantExperts)}
    assert len(experts) == 2
    for name, mod in experts.items():
        for p in ("gate_up_proj", "down_proj"):
            shipped_w = shipped[f"{name}.{p}"]
            assert torch.equal(getattr(mod, p).double(), shipped_w)
            assert torch.equal(mod.quantized_weight(p).transpose(1, 2).double(), shipped_w)  # fake quant: no change
    ids = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        s, t, h = student(ids).logits, teacher(ids).logits, theirs(ids).logits
    assert torch.equal(t, h)  # the teacher is transformers' dequantized model
    # same weights; the experts' loop is ours, not transformers' grouped matmul, so equal up to the fp32 sum order
    # (bit for bit on this CPU)
    torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-6)
    # with mxfp4 activations too the expert weights still start exactly at the shipped ones
    both = load_model(mxfp4_folder, "float32", "eager")
    quantize_model(both, parse("mxfp4"), exclude=KEEP)
    for name, mod in both.named_modules():
        if isinstance(mod, QuantExperts):
            assert torch.equal(mod.quantized_weight("down_proj").transpose(1, 2).double(),
                               shipped[f"{name}.down_proj"])


def test_refusals_name_the_problem_in_one_line(mxfp4_folder):
    # experts whose reduction width is not a whole number of fp4 blocks
    cfg = tiny_moe("gpt_oss").config
    cfg.intermediate_size = 24
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(SpecError, match=r"do not divide in_features=24 of model\.layers\.0\.mlp\.experts\."
                       r"down_proj; exclude the layer"):
        quantize_model(model, parse("wmxfp4"))
    # a QLoRA base packs integer or NF4 codes; fp4 is refused before anything is packed
    with pytest.raises(ValueError, match=r"a QLoRA base packs integer or NF4 grids, not mxfp4") as err:
        build_base(mxfp4_folder, parse("wmxfp4"), "float32", "eager", double_quant=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("learnable", ["none", "lsq"])
def test_nvfp4_tensor_scale_is_per_expert(learnable):
    """Each expert exports as a linear of its own with its own NVFP4 tensor scale: an expert 2^12 smaller than the
    others keeps its e4m3 block scales out of the subnormals (one scale over the stack would put them there)."""
    model = tiny_moe("qwen3_moe")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("experts.down_proj"):
                p[0] *= 2.0**-12
    spec = parse("wnvfp4")
    quantize_model(model, replace(spec, weight=replace(spec.weight, learnable=learnable)))
    mod = next(m for m in model.modules() if isinstance(m, QuantExperts))
    w, q = mod.canonical("down_proj").detach(), mod.quantized_weight("down_proj")
    for e in range(w.shape[0]):
        assert torch.equal(q[e].double(), ref_fp4_expert(w[e], "nvfp4", w[e])[0]), e
    assert not torch.equal(q[0].double(), ref_fp4_expert(w[0], "nvfp4", w)[0])

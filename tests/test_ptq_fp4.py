"""PTQ at the fp4 formats (NVFP4, MXFP4): GPTQ against a float64 reference, the clipping search in block-scale
space, frozen results that fake-quantize back to themselves bit for bit, and `distqat ptq` end to end (with int
w4a4kv4 beside them)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from helpers import PUBLISHED
from helpers.models import tiny_ids, tiny_llama, tiny_run_dir
from torch import nn

from qat.fp4 import fp4_codes, round_scale
from qat.io.folders import Kind, inspect
from qat.linear import QuantLinear
from qat.load import load
from qat.ptq import PTQConfig, run_ptq
from qat.ptq import check as check_ptq
from qat.ptq.awq import search_clip
from qat.ptq.fp4grid import clip_scales, storable_scales, tensor_exponent
from qat.ptq.gptq import GPTQ, GPTQConfig, gptq
from qat.ptq.grid import check_storable, freeze, frozen_spec, output_error, rtn
from qat.quantizers import fake_quant, minmax_qparams, mse_qparams, quantize_codes, weight_rows
from qat.spec import parse
from trainer.cli import main

F64 = torch.float64
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=F64)
# Every positive finite e4m3fn value in float64: subnormals m/8 2^-6, normals (1 + m/8) 2^(e-7), 448 the largest.
E4M3 = torch.tensor([m / 8 * 2.0**-6 for m in range(1, 8)]
                    + [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)],
                    dtype=F64)


def ref_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value in float64, ties to the even magnitude index (0, 1, 2, 4 ...), saturating at 6."""
    a = y.abs().clamp_max(6.0).unsqueeze(-1)
    d = (E2M1 - a).abs()
    near = d == d.amin(-1, keepdim=True)
    even = near & (torch.arange(8) % 2 == 0)
    idx = torch.where(even.any(-1), even.to(torch.int8).argmax(-1), near.to(torch.int8).argmax(-1))
    return torch.copysign(E2M1[idx], y)


def ref_scales(absmax: torch.Tensor, fmt: str) -> torch.Tensor:
    """RTN block scales of (R, 1) absmax in float64: MXFP4 compressed-tensors' exponent (amax at one mantissa bit,
    1.75 rounding up, minus 2); NVFP4 the nearest e4m3 value of amax / 6 over the largest power of two G keeping
    the largest block within 448."""
    if fmt == "mxfp4":
        e = torch.floor(torch.log2(absmax))
        top = torch.where(absmax / 2.0**e >= 1.75, e + 1, e)
        return 2.0 ** (top - 2)
    eff = absmax / 6.0
    k = math.floor(math.log2(448.0 / float(eff.max())))
    g = 2.0**k
    s = eff * g
    nearest = (E4M3 - s).abs().argmin(-1, keepdim=True)  # no exact ties on random data
    return E4M3[nearest.squeeze(-1)].unsqueeze(-1) / g


def reference_gptq(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, group: int, damp: float,
                   act_order: bool) -> torch.Tensor:
    """GPTQ as optimal brain surgeon, column by column in float64 (no lazy blocks, no Cholesky): round column i
    onto e2m1 x its block's fixed scale, move the error onto the columns not yet rounded with H^-1's row i, and
    drop i from H^-1 (its Schur complement). Returns the e2m1 values (out, in)."""
    W, H = w.clone(), h.clone()
    n = W.shape[1]
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + damp * torch.diag(H).mean() * torch.eye(n, dtype=F64)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros_like(W)
    for i in range(n):
        s = scales[:, int(perm[i]) // group]
        y = ref_e2m1(W[:, i] / s)
        codes[:, i] = y
        err = (W[:, i] - y * s) / Hinv[i, i]
        W[:, i:] -= err.unsqueeze(1) * Hinv[i, i:].unsqueeze(0)
        Hinv = Hinv - Hinv[:, i : i + 1] @ Hinv[i : i + 1, :] / Hinv[i, i]
    return codes[:, torch.argsort(perm)]


def correlated(n=1024, d=64, seed=0, sample_seed=None):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d, dtype=F64) + torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    if sample_seed is not None:
        g.manual_seed(sample_seed)
    x = torch.randn(n, d, generator=g, dtype=F64) @ mix
    x[:, :4] *= 8.0  # a few outlier channels, as in LLM activations
    return x


def weight(out=16, d=64, seed=1):
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------
# GPTQ against float64.


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_fp4_matches_float64_reference(fmt, act_order):
    """Same H, same column order, the same static block scales (RTN's, from the weight before any update): the
    e2m1 values GPTQ picks are the float64 reference's, code for code. Lazy blocks of 16 columns and the
    Cholesky form of H^-1 change the float64 arithmetic, not the rounding, on random data."""
    spec = parse(f"w{fmt}").weight
    x, w = correlated(), weight()
    h = x.T @ x / len(x)
    q, codes, scale, zero = gptq(w, h, spec, damp=0.1, block_size=16, act_order=act_order)
    g = spec.group_size
    want = ref_scales(w.reshape(-1, g).abs().amax(-1, keepdim=True), fmt)
    assert zero is None and torch.equal(scale.double(), want)
    ref = reference_gptq(w, h, want.reshape(w.shape[0], -1), g, 0.1, act_order)
    got = ref_e2m1(q.reshape(-1, g) / want).reshape(w.shape)  # the values, from the dequantized weight
    assert torch.equal(got, ref)
    nibble = (E2M1 == ref.abs().unsqueeze(-1)).to(torch.int8).argmax(-1) | (ref < 0).long() << 3
    assert torch.equal(codes.long(), nibble)  # sign << 3 | magnitude index, as compressed-tensors packs them
    torch.testing.assert_close(q, (ref.reshape(-1, g) * want).reshape(w.shape), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_gptq_fp4_output_error_below_rtn(fmt):
    """tr((W - Wq) H (W - Wq)^T) of GPTQ well under RTN's (0.44-0.47 of it measured on the calibration inputs,
    0.50-0.52 on held-out inputs of the same distribution); groups computed as GPTQ reaches them too."""
    spec = parse(f"w{fmt}").weight
    x, xt, w = correlated(), correlated(sample_seed=5), weight()
    h, ht = x.T @ x / len(x), xt.T @ xt / len(xt)
    q_rtn = rtn(w, spec)[0].double()
    for act_order, static in ((True, True), (False, True), (False, False)):
        q = gptq(w, h, spec, damp=0.1, act_order=act_order, static_groups=static)[0]
        assert output_error(w, q, h) < 0.6 * output_error(w, q_rtn, h)
        assert output_error(w, q, ht) < 0.7 * output_error(w, q_rtn, ht)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_rtn_is_the_quantizers_rounding(fmt):
    """RTN's weight, codes and scales are the fake quant of a WeightQuantizer with the same spec (its arithmetic
    nibbles are qat.fp4's fp4_codes, -0 and every e2m1 value included)."""
    spec = parse(f"w{fmt}").weight
    w = weight().float()
    deq, codes, scale, _ = rtn(w, spec)
    rows = weight_rows(w, spec)
    want_scale = minmax_qparams(rows, spec)[0]
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.reshape(rows.shape), quantize_codes(rows, want_scale, None, spec))
    assert torch.equal(deq, fake_quant(rows, spec).reshape(w.shape))
    values = torch.cat([E2M1, -E2M1]).float()
    assert torch.equal(fp4_codes(values), torch.cat([torch.arange(8), torch.arange(8) + 8]).to(torch.int32)
                       .masked_fill(values == 0, 0))


# ---------------------------------------------------------------------------------------------
# The clipping search, in block-scale space.


def blocks(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Blocks of Gaussian, heavy-tailed and outlier-carrying rows at spread magnitudes, in float64."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, size, generator=g, dtype=F64)
    r[n // 3 : 2 * n // 3] **= 3  # heavy tails
    r[2 * n // 3 :, 0] *= 6.0
    return r * torch.exp2(torch.randint(-4, 4, (n, 1), generator=g).double())


def window(absmax: float, fmt: str, g: float) -> torch.Tensor:
    """Every storable scale from the largest <= max|x| / 12 to the smallest >= max|x| / 6 (float64)."""
    lo, hi = absmax / 12.0, absmax / 6.0
    if fmt == "mxfp4":
        return 2.0 ** torch.arange(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1, dtype=F64)
    v = E4M3 / g
    below, above = v[v <= lo].max(), v[v >= hi].min()
    return v[(v >= below) & (v <= above)]


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_clip_search_picks_the_best_storable_block_scale(fmt):
    """Per block, the scale the search chooses has the least sum |x - Q(x)|^2.4 (float64) of every storable scale
    between the one just below half the range and the one just above it: all e4m3 values over the weight's G
    (NVFP4; 9-10 per block) or the powers of two (MXFP4: 2^e's neighbours on both sides). So it is never worse
    than RTN's scale nor than quantizers.mse_qparams' shrink grid, which never rounds a scale up, and the scales
    store as they are (one tensor scale)."""
    size = 16 if fmt == "nvfp4" else 32
    rows = blocks(96, size)
    k = tensor_exponent(rows)
    g = 2.0 ** int(k)
    chosen = clip_scales(rows, fmt)
    assert torch.equal(round_scale(chosen, fmt), chosen)

    def err(scale):
        return (ref_e2m1(rows / scale) * scale - rows).abs().pow(2.4).sum(-1)

    e_chosen = err(chosen.double())
    widths = []
    for i, row in enumerate(rows):
        cands = window(float(row.abs().max()), fmt, g)
        widths.append(len(cands))
        e = (ref_e2m1(row / cands.unsqueeze(-1)) * cands.unsqueeze(-1) - row).abs().pow(2.4).sum(-1)
        assert float(e_chosen[i]) <= float(e.min()), (i, cands, e, chosen[i])
        assert any(float(chosen[i]) == float(c) for c in cands)
    assert min(widths) >= (8 if fmt == "nvfp4" else 2)
    rtn_scale = storable_scales(rows.abs().amax(-1, keepdim=True), fmt, None)
    assert torch.equal(rtn_scale.double(), ref_scales(rows.abs().amax(-1, keepdim=True), fmt))
    old = mse_qparams(rows.float(), parse(f"w{fmt}").weight)[0]
    assert bool((e_chosen <= err(rtn_scale.double())).all()) and bool((e_chosen <= err(old.double())).all())
    assert float(e_chosen.sum()) < float(err(rtn_scale.double()).sum())
    if fmt == "nvfp4":  # e4m3 neighbours above RTN's scale win on some blocks: the shrink grid cannot reach them
        assert int((chosen > rtn_scale).sum()) > 0 and float(e_chosen.sum()) < float(err(old.double()).sum())
    else:  # 2^(e+1) ties at best with compressed-tensors' 2^e (6 x 2^e is 3 x 2^(e+1)); 2^(e-1) clips some blocks
        assert int((chosen < rtn_scale).sum()) > 0


def test_gptq_clip_and_awq_clip_at_fp4_lower_the_output_error():
    """`ptq.gptq.clip` at NVFP4 shrinks block scales (never past storable values) and lowers GPTQ's output error;
    AWQ's clipping search (after which rtn takes each block's scale) lowers RTN's."""
    spec = parse("wnvfp4").weight
    x = correlated()
    h, w = x.T @ x / len(x), weight()
    q0, _, s0, _ = GPTQ(GPTQConfig(clip=False)).round(w, spec, h)
    q1, _, s1, _ = GPTQ(GPTQConfig(clip=True)).round(w, spec, h)
    assert float((s1 < s0).float().mean()) > 0.2
    assert output_error(w, q1, h) < 0.95 * output_error(w, q0, h)
    clipped = search_clip(w, h, spec)
    assert output_error(w, rtn(clipped, spec)[0].double(), h) < 0.8 * output_error(w, rtn(w, spec)[0].double(), h)


# ---------------------------------------------------------------------------------------------
# Frozen results.


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_frozen_gptq_layer_fake_quantizes_to_the_gptq_weight_bit_for_bit(fmt):
    """The lsq quantizer rounds the frozen block scales again (qat.fp4.round_scale); they are storable, so fake
    quant gives back the GPTQ weight exactly, in fp32 and in bf16 (e2m1 x a 4-bit scale fits bf16), and the
    codes GPTQ chose, before and after a state-dict round trip."""
    spec = frozen_spec(parse(f"w{fmt}")).weight
    x = correlated()
    lin = nn.Linear(64, 16, bias=False)
    lin.weight.data = weight().float() * 0.02
    q = QuantLinear.from_linear(lin, spec)
    deq, codes, scale, zero = GPTQ(GPTQConfig(clip=True)).round(lin.weight, spec, (x.T @ x / len(x)).float())
    freeze(q, deq, scale, zero)
    assert torch.equal(q.quantized_weight().detach(), deq)
    assert torch.equal(q.weight_quantizer.quantize(q.weight)[0], codes)
    again = QuantLinear.from_linear(nn.Linear(64, 16, bias=False), spec)
    again.load_state_dict(q.state_dict())
    assert torch.equal(again.quantized_weight().detach(), deq)
    again.to(torch.bfloat16)
    assert torch.equal(again.quantized_weight().detach(), deq.bfloat16())
    with pytest.raises(RuntimeError, match="not storable over one tensor scale"):
        check_storable(scale * 1.01, spec)


def test_experts_share_one_nvfp4_tensor_scale():
    """One NVFP4 tensor scale for a weight: block scales of a weight's slice computed over the whole weight's
    exponent (what MoE experts rounded one at a time and GPTQ's late groups take) store as they are, where the
    slice's own exponent would lose bits in the whole weight's rounding."""
    spec = parse("wnvfp4").weight
    w = weight(32, 64)
    w[16:] *= 2.0**-16  # a second "expert" whose blocks sit 16 binades lower: e4m3 subnormals over the whole G
    rows = weight_rows(w, spec)
    k = tensor_exponent(rows)
    small = weight_rows(w[16:], spec)
    shared = rtn(w[16:], spec, nvfp4_exp=k)[2]
    own = rtn(w[16:], spec)[2]
    whole = torch.cat([rtn(w[:16], spec, nvfp4_exp=k)[2], shared])
    assert torch.equal(round_scale(whole, "nvfp4"), whole)
    assert not torch.equal(round_scale(torch.cat([rtn(w[:16], spec)[2], own]), "nvfp4"),
                           torch.cat([rtn(w[:16], spec)[2], own]))
    assert int(tensor_exponent(small)) > int(k)


def test_moe_experts_rounded_one_by_one_share_the_parameters_nvfp4_tensor_scale():
    """GPTQ rounds a fused experts parameter expert by expert; its quantizer holds one NVFP4 tensor scale for all of
    them, so each expert rounds over the parameter's exponent: an expert 16 binades below the others (whose own
    exponent would give scales the shared one cannot hold) still fake-quantizes back to its GPTQ weight."""
    cfg = tf.Qwen3MoeConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                            num_experts_per_tok=2, initializer_range=0.1)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        for p in experts.parameters():
            p[1] *= 2.0**-16
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    run_ptq(model, parse("wnvfp4"), PTQConfig(method="gptq", progress=False, device="cpu"), calib)
    mod = model.model.layers[0].mlp.experts
    for param in mod.weight_quantizers:
        assert torch.equal(mod.quantized_weight(param), mod.canonical(param))
        w = mod.canonical(param)
        assert w[1].abs().max() < 2.0**-14 and w[1].abs().max() > 0


@pytest.mark.parametrize("method,scheme", [("awq+gptq", "wnvfp4"), ("smoothquant+gptq", "mxfp4")])
def test_transforms_compose_with_fp4_and_hqq_refuses_it(method, scheme):
    """AWQ's scale and clipping searches and SmoothQuant's fold compose with fp4 weights (their errors are measured
    through rtn, which takes fp4 block scales); the result is frozen on its grid. HQQ's solver optimises an integer
    grid's zero point, so it refuses fp4 in one line."""
    model = tiny_llama()
    x = tiny_ids()
    fp = model(x).logits
    model, report = run_ptq(model, parse(scheme), PTQConfig(method=method, progress=False, batch_size=2),
                            tiny_ids(4, 32, seed=0))
    assert {d["algorithm"] for d in report.layers} >= {method}
    qs = [m for m in model.modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None]
    assert len(qs) == 14 and all(torch.equal(m.quantized_weight().detach(), m.weight.detach()) for m in qs)
    out = model(x).logits
    assert (out - fp).abs().mean() < 0.5 * fp.abs().mean()
    with pytest.raises(ValueError, match=r"^ptq.method=hqq needs an integer weight grid, not "
                                         r"quant.weight.format=nvfp4$"):
        check_ptq(parse("wnvfp4"), PTQConfig(method="hqq"))


# ---------------------------------------------------------------------------------------------
# `distqat ptq` end to end.


@pytest.fixture(scope="module")
def root(tmp_path_factory, bundled_tokenizer):
    return tiny_run_dir(tmp_path_factory.mktemp("ptq_fp4"), bundled_tokenizer)


@pytest.mark.parametrize("scheme", ["nvfp4", "w4a4kv4"])
@pytest.mark.parametrize("method", ["rtn", "gptq", "rotate+gptq"])
def test_ptq_command_writes_a_folder_qat_starts_from(root, tmp_path, capsys, method, scheme):
    """`distqat ptq` at each method writes a PTQ folder; loaded (as train.init loads it), every quantized linear's
    fake-quant weight is its stored (frozen) weight, bit for bit; fp4 in bf16 too (what a bf16 student trains)."""
    out = tmp_path / "out"
    code = main(["ptq", PUBLISHED, f"model.name_or_path={root / 'teacher'}", f"data.path={root / 'corpus.txt'}",
                 f"output_dir={out}", f"ptq.method={method}", f"quant.scheme={scheme}", "ptq.n_samples=4",
                 "ptq.seq_len=32", "ptq.progress=false", "ptq.gptq.clip=true"])
    assert code == 0, capsys.readouterr().err[-2000:]
    folder = inspect(out / "model")
    assert folder.kind is Kind.PTQ and folder.record["method"] == method
    for dtype in ("float32", "bfloat16") if scheme == "nvfp4" else ("float32",):
        model = load(out / "model", dtype)
        qs = [m for m in model.modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None]
        assert len(qs) == 14  # 7 linears in each of 2 blocks; the head stays full precision
        for m in qs:
            assert m.weight_quantizer.spec.learnable == "lsq"
            assert m.weight.dtype == getattr(torch, dtype)
            assert torch.equal(m.quantized_weight().detach(), m.weight.detach())
            if scheme == "nvfp4":
                s = m.weight_quantizer.scale.detach().float()
                assert m.weight_quantizer.spec.format == "nvfp4" and torch.equal(round_scale(s, "nvfp4"), s)

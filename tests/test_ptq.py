"""PTQ baselines: float64 references on small random problems, and end to end on a tiny random Llama."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from qat.linear import QuantLinear
from qat.ptq import Int8OutlierLinear, PTQConfig, load_ptq_model, parse_method, run_ptq
from qat.ptq.awq import search_clip, search_scale
from qat.ptq.blocks import block_groups, capture_inputs, collect, fold, foldable
from qat.ptq.calib import calibration_ids
from qat.ptq.gptq import gptq
from qat.ptq.grid import freeze, frozen_spec, output_error, rtn
from qat.ptq.hqq import hqq
from qat.ptq.llm_int8 import reference_llm_int8
from qat.ptq.smoothquant import smooth_scales
from qat.spec import parse

F64 = torch.float64


def correlated(n=1024, d=64, seed=0, outliers=4, sample_seed=None):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d, dtype=F64) + torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    if sample_seed is not None:
        g.manual_seed(sample_seed)
    x = torch.randn(n, d, generator=g, dtype=F64) @ mix
    x[:, :outliers] *= 8.0  # a few outlier channels, as in LLM activations
    return x


def weight(out=32, d=64, seed=1):
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------
# Algorithms against float64 references.


@pytest.mark.parametrize("scheme", ["w4", "w4g16", "w3g16asym"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(scheme, act_order):
    spec = parse(scheme).weight
    x, w = correlated(), weight()
    h = x.T @ x / len(x)
    q_rtn = rtn(w, spec)[0].double()
    q, codes, scale, zero = gptq(w, h, spec, act_order=act_order)
    assert q.dtype == F64
    assert output_error(w, q, h) < 0.6 * output_error(w, q_rtn, h)
    # Held-out inputs from the same distribution: still better (no overfitting).
    xt = correlated(sample_seed=5)
    assert output_error(w, q, xt.T @ xt / len(xt)) < output_error(w, q_rtn, xt.T @ xt / len(xt))


@pytest.mark.parametrize("scheme", ["w4", "w4g32", "w3g32asym"])
def test_gptq_defaults_generalise_when_calibration_underrepresents_directions(scheme):
    """The bundled model's failure, in float64: GPTQ pushes rounding error into input directions the
    calibration set barely excites (a quarter of them, 50x weaker in calibration, only 5x weaker in held-out
    text, as news vs Wikipedia activations of down_proj). With the paper's damp 0.01 and no act-order it then
    loses to RTN on held-out inputs while winning on the calibration set; PTQConfig's defaults (damp 0.1,
    act-order) keep the win on held-out inputs."""
    d = 128
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=F64))[0]

    def inputs(n, weak, seed):
        sv = torch.ones(d, dtype=F64)
        sv[-d // 4:] = weak**0.5
        return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64) * sv) @ basis.T

    xc, xt = inputs(1024, 0.02, 1), inputs(16384, 0.2, 2)
    hc, ht = xc.T @ xc / len(xc), xt.T @ xt / len(xt)
    w = weight(32, d, seed=3)
    spec = parse(scheme).weight
    q_rtn = rtn(w, spec)[0].double()
    cfg = PTQConfig()
    q = gptq(w, hc, spec, damp=cfg.damp, act_order=cfg.act_order)[0]
    assert output_error(w, q, hc) < 0.7 * output_error(w, q_rtn, hc)
    assert output_error(w, q, ht) < 0.95 * output_error(w, q_rtn, ht)
    q_paper = gptq(w, hc, spec, damp=0.01, act_order=False)[0]  # the previous defaults
    assert output_error(w, q_paper, hc) < 0.7 * output_error(w, q_rtn, hc)
    assert output_error(w, q_paper, ht) > output_error(w, q_rtn, ht)


@pytest.mark.parametrize("scheme,act_order,static", [("w4g16", True, True), ("w4g16asym", False, False),
                                                     ("w3asym", False, True), ("w4g16", False, True)])
def test_gptq_codes_frozen_bit_for_bit(scheme, act_order, static):
    """The QuantLinear's quantizer gives back exactly the codes GPTQ chose, and forward uses them."""
    spec = frozen_spec(parse(scheme)).weight
    x, w = correlated(), weight()
    lin = nn.Linear(64, 32, bias=False)
    lin.weight.data = w.float()
    q = QuantLinear.from_linear(lin, spec)
    deq, codes, scale, zero = gptq(lin.weight, (x.T @ x / len(x)).float(), spec, act_order=act_order,
                                   static_groups=static, scale_dtype=torch.float32)
    freeze(q, deq, scale, zero)
    got, s, z = q.weight_quantizer.quantize(q.weight)
    assert torch.equal(got, codes)
    # The stored weight sits on its grid: fake quant gives it back (to an ulp: the lsq scale passes through
    # _grad_scale, whose forward x - x*g + x*g is not always bit-exact in fp32).
    torch.testing.assert_close(q.quantized_weight().detach(), q.weight.detach(), rtol=1e-6, atol=0)


def test_awq_scales_lower_output_error_than_rtn():
    spec = parse("w3g16").weight
    x, w = correlated(outliers=6), weight()
    h = x.T @ x / len(x)
    s, errors = search_scale([w], h, x.abs().mean(0), spec, grid=20)
    q_awq = rtn(w * s, spec)[0].double() / s  # X/s @ Q(W s)^T, s folded into the previous op
    q_rtn = rtn(w, spec)[0].double()
    assert errors[0.0] == pytest.approx(output_error(w, q_rtn, h))
    assert output_error(w, q_awq, h) < 0.9 * output_error(w, q_rtn, h)
    # The clipping search (per row and group, like the reference: cross-group terms of H are ignored) on
    # inputs without cross-channel correlation, where that objective is exact: never worse, usually better.
    xi = torch.randn(2048, 64, generator=torch.Generator().manual_seed(2), dtype=F64)
    hi = xi.T @ xi / len(xi)
    clipped = search_clip(w, hi, spec)
    assert not torch.equal(clipped, w)
    assert output_error(w, rtn(clipped, spec)[0].double(), hi) < output_error(w, q_rtn, hi)


def test_hqq_lowers_weight_error_vs_rtn():
    w = weight(64, 128)
    w[:, 3] *= 6  # heavy-tailed rows, where HQQ's outlier-robust fit helps
    for scheme in ("w4g32asym", "w3g32asym", "w4g32", "w3"):
        spec = parse(scheme).weight
        e_rtn = torch.linalg.norm(rtn(w, spec)[0].double() - w)
        deq, codes, s, z = hqq(w, spec, iters=20)
        assert torch.linalg.norm(deq - w) < e_rtn, scheme
        # The codes and (integer) zero points reproduce deq on the spec's grid.
        from qat.quantizers import dequantize_codes, weight_rows
        again = dequantize_codes(weight_rows(codes, spec), s, z, spec).reshape(w.shape)
        torch.testing.assert_close(again.double(), deq, rtol=1e-6, atol=1e-6)


def test_llm_int8_equals_fp_matmul_when_threshold_covers_all_columns():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, dtype=F64)
    x = torch.randn(3, 5, 64, dtype=F64)
    m = Int8OutlierLinear.from_linear(lin, threshold=0.0)
    torch.testing.assert_close(m(x), lin(x), rtol=1e-12, atol=1e-12)


def test_llm_int8_matches_float64_reference():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(2, 7, 64)
    x[..., [3, 17]] *= 20  # outlier features above 6.0
    m = Int8OutlierLinear.from_linear(lin, threshold=6.0)
    assert int(m.outlier_columns(x.reshape(-1, 64)).sum()) >= 2
    ref = reference_llm_int8(x, lin.weight, 6.0, lin.bias)
    torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)
    err = (m(x) - lin(x)).abs().max() / lin(x).abs().max()
    assert err < 0.02


def test_llm_int8_fast_path_arithmetic_on_cpu(monkeypatch):
    """The CUDA path's arithmetic (torch._int_mm with int32 accumulation, fp32 rescale, fp16 outliers),
    forced on CPU where torch._int_mm exists too: exact integer products, and close to the reference."""
    from qat.ptq.llm_int8 import int_matmul

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (48, 64), generator=g, dtype=torch.int8)
    exact = a.long() @ b.long().t()
    fast = int_matmul(a, b, fast=True)
    assert fast.dtype == torch.int32 and torch.equal(fast.long(), exact)
    assert torch.equal(int_matmul(a, b, fast=False).long(), exact)

    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *t: calls.append(1) or real(*t))
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(32, 64)
    x[:, 5] *= 20
    ref = Int8OutlierLinear.from_linear(lin, 6.0)(x)
    m = Int8OutlierLinear.from_linear(lin, 6.0)
    m.fast_path = True
    got = m(x)
    assert calls, "the fast path did not reach torch._int_mm"
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    # fp16 outliers and fp32 rescaling differ from the float64 reference, but only by rounding.
    assert 0 < (got - ref).abs().max() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llm_int8_cuda_matches_cpu():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(32, 64)
    x[:, 5] *= 20
    cpu = Int8OutlierLinear.from_linear(lin, 6.0)(x)
    gpu = Int8OutlierLinear.from_linear(copy.deepcopy(lin).cuda(), 6.0)(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# Tiny Llama end to end.


def tiny_llama(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def ids(n=4, t=32, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("transform", ["smoothquant", "awq"])
def test_fold_leaves_fp_outputs_unchanged(transform):
    """SmoothQuant's (and AWQ's) scales folded into norms / previous linears: the fp model is unchanged."""
    model = tiny_llama(F64)
    x = ids()
    before = model(x).logits
    inputs, kwargs = capture_inputs(model, x, 2, torch.device("cpu"))
    for layer in model.model.layers:
        groups = block_groups(layer)
        collect(layer, groups, inputs, kwargs, want_h=True)
        n_folded = 0
        for g in groups:
            if not foldable(layer, g):
                continue
            ws = [layer.get_submodule(n).weight for n in g.names]
            if transform == "smoothquant":
                s = smooth_scales(ws, g.stats.absmax, 0.5)
            else:
                s = search_scale(ws, g.stats.h, g.stats.absmean, parse("w3").weight, grid=5)[0]
                s = s * torch.linspace(0.5, 2.0, len(s), dtype=F64)  # make sure it is not ~1
            fold(layer, g, s)
            n_folded += 1
        assert n_folded == 3  # qkv, gate/up, down (v->o has GQA shapes)
        inputs = [layer(h, **kw) for h, kw in zip(inputs, kwargs)]
    torch.testing.assert_close(model(x).logits, before, rtol=1e-9, atol=1e-9)


E2E = [("rtn", "w4g16"), ("gptq", "w4g16asym"), ("awq", "w3g16"), ("hqq", "w4g16asym"),
       ("smoothquant", "w8a8"), ("awq+gptq", "w4"), ("smoothquant+gptq", "w8a8"), ("llm_int8", "w8a8")]


@pytest.mark.parametrize("method,scheme", E2E)
def test_end_to_end_tiny_llama(method, scheme, tmp_path):
    model = tiny_llama()
    x = ids(2, 16, seed=1)
    fp = model(x).logits
    cfg = PTQConfig(method=method, progress=False, act_order=method == "gptq", batch_size=2)
    model, report = run_ptq({"quant": scheme, "ptq": cfg}, model, calib_ids=ids())
    out = model(x).logits
    assert torch.isfinite(out).all()
    assert not torch.equal(out, fp)
    assert (out - fp).abs().mean() < 0.5 * fp.abs().mean()
    assert report.layers and all("seconds" in d for d in report.layers)
    if method != "llm_int8":
        assert len(report.blocks) == 2
        for m in model.modules():
            if isinstance(m, QuantLinear):
                w = m.weight.detach()
                torch.testing.assert_close(m.quantized_weight().detach(), w, rtol=1e-6, atol=0)  # on its grid
    model.save_pretrained(tmp_path / "q")
    again = load_ptq_model(tmp_path / "q")
    assert torch.equal(again(x).logits, out)
    if method != "llm_int8":
        for (_n, a), (_, b) in zip(model.named_modules(), again.named_modules()):
            if isinstance(a, QuantLinear):
                assert torch.equal(a.weight_quantizer.quantize(a.weight)[0], b.weight_quantizer.quantize(b.weight)[0])
        # The PTQ folder converts to integer weights that compute the same model.
        from qat.export import convert_folder, load_quantized

        rt = load_quantized(convert_folder(tmp_path / "q", tmp_path / "int"))
        got = rt(x).logits
        if "a" in scheme.replace("asym", ""):  # int8 activations: integer accumulation vs fp32 matmul
            torch.testing.assert_close(got, out, rtol=0.02, atol=0.02 * out.abs().max().item())
        else:
            torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)


def test_static_activation_scales_calibrated_block_by_block(tmp_path):
    from qat.quantizers import ActQuantizer
    from qat.spec import TensorSpec

    spec = parse("w8a8")
    spec.activation = TensorSpec(bits=8, granularity="tensor", dynamic=False)
    model, _ = run_ptq({"quant": spec, "ptq": PTQConfig(method="smoothquant", progress=False)}, tiny_llama(),
                       calib_ids=ids())
    statics = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    assert statics and all(float(m.scale) > 0 for m in statics)
    x = ids(2, 16, seed=1)
    model.save_pretrained(tmp_path / "s")
    assert torch.equal(load_ptq_model(tmp_path / "s")(x).logits, model(x).logits)


def test_gptq_beats_rtn_on_tiny_llama_layer_outputs():
    """Block-wise: the quantized model's last hidden state is closer to fp with GPTQ than with RTN."""
    x = ids(8, 32, seed=3)
    fp = tiny_llama().model(x).last_hidden_state
    errs = {}
    for method in ("rtn", "gptq"):
        m, _ = run_ptq({"quant": "w3g16", "ptq": PTQConfig(method=method, progress=False)}, tiny_llama(),
                       calib_ids=x)
        errs[method] = float((m.model(x).last_hidden_state - fp).pow(2).mean().detach())
    assert errs["gptq"] < errs["rtn"]


class CharTokenizer:
    """A stand-in tokenizer: one id per character."""

    all_special_ids: list[int] = []

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def __len__(self):
        return 128


def test_calibration_from_local_text_and_generated(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(f"line {i} of some calibration text" for i in range(20)))
    got = calibration_ids(CharTokenizer(), 4, 16, str(path), "train")
    assert got.shape == (4, 16)
    run_cfg = SimpleNamespace(quant=parse("w4g16"), ptq=PTQConfig(method="gptq", n_samples=4, seq_len=16,
                                                                   progress=False),
                              data=SimpleNamespace(path=str(path), text_field="text"))
    model, report = run_ptq(run_cfg, tiny_llama(), CharTokenizer())
    assert report.calib_tokens == 64
    gen = calibration_ids(None, 2, 8, "generate", model=tiny_llama())
    assert gen.shape == (2, 8) and int(gen.max()) < 128


def one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_bad_inputs_give_one_line_errors(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("too short")
    one_line_error(lambda: calibration_ids(CharTokenizer(), 128, 512, str(path), "train"),
                   r"fewer than ptq.n_samples \* ptq.seq_len = 128 \* 512 = 65536")
    calib = ids()
    cases = [
        ("hqq", "w4a8", "hqq is weight-only"),
        ("smoothquant", "w4g16", "smoothquant migrates activation outliers"),
        ("llm_int8", "w4g16", "llm_int8 is int8"),
        ("gptq", "w8a8kv8", None),  # fine: kv is installed after the weights
    ]
    for method, scheme, match in cases:
        def fn(method=method, scheme=scheme):
            return run_ptq({"quant": scheme, "ptq": PTQConfig(method=method, progress=False)}, tiny_llama(),
                           calib_ids=calib)

        if match is None:
            fn()
        else:
            one_line_error(fn, match)
    one_line_error(lambda: parse_method("gptq+hqq"), "pick one weight rounding")
    one_line_error(lambda: parse_method("rtm"), "unknown method 'rtm'")
    one_line_error(lambda: parse_method("llm_int8+gptq"), "composes with nothing")
    assert parse_method(["gptq", "awq"]) == ["awq", "gptq"]
    assert parse_method("smoothquant") == ["smoothquant", "rtn"]
    gemma = tiny_llama()
    gemma.config.model_type = "gemma"
    one_line_error(lambda: run_ptq({"quant": "w4", "ptq": PTQConfig(method="awq", progress=False)}, gemma,
                                   calib_ids=calib), "cannot be folded")
    done, _ = run_ptq({"quant": "w4", "ptq": PTQConfig(method="rtn", progress=False)}, tiny_llama())
    one_line_error(lambda: run_ptq({"quant": "w4", "ptq": PTQConfig(method="rtn")}, done), "quantized already")


def test_blocks_visit_the_device_one_at_a_time(monkeypatch):
    """The loop moves decoder block i to the device, quantizes it, runs it, and moves it back before
    block i + 1 goes: only one block is ever resident (recorded on CPU through Module.to)."""
    from qat.ptq.blocks import decoder_layers

    model = tiny_llama()
    layers = decoder_layers(model)
    events = []
    real_to = nn.Module.to

    def to(self, *args, **kw):
        for i, layer in enumerate(layers):
            if self is layer:
                events.append((i, str(args[0] if args else kw.get("device"))))
        return real_to(self, *args, **kw)

    monkeypatch.setattr(nn.Module, "to", to)
    run_ptq({"quant": "w4g16", "ptq": PTQConfig(method="gptq", progress=False, device="cpu")}, model,
            calib_ids=ids())
    want = [(i, "cpu") for i in range(len(layers)) for _ in range(2)]
    assert events == want
    resident, peak = set(), 0
    for i, _ in events:
        resident ^= {i}  # to(device) adds, to(home) removes
        peak = max(peak, len(resident))
    assert peak == 1 and not resident


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_one_block_resident_on_cuda(method):
    """The model stays on the CPU; each block visits the GPU; the result matches a CPU run."""
    scheme = "w8a8" if method == "smoothquant" else "w4g16"
    x = ids()
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = PTQConfig(method=method, progress=False, device=device)
        model, _ = run_ptq({"quant": scheme, "ptq": cfg}, tiny_llama(), calib_ids=x)
        assert all(p.device.type == "cpu" for p in model.parameters())
        runs[device] = model(x).logits.detach()
    torch.testing.assert_close(runs["cuda"], runs["cpu"], rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------
# `python -m trainer ptq`: bad input stops in one line, before the model loads.


def test_cli_bad_inputs_one_line_before_loading(tmp_path, bundled_tokenizer):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import save_tiny_teacher

    root = Path(__file__).resolve().parents[1]
    teacher = save_tiny_teacher(tmp_path / "teacher", bundled_tokenizer)
    calib = tmp_path / "calib.txt"
    calib.write_text("A short calibration text of a few dozen tokens, far fewer than asked for.\n" * 3)

    def ptq(*overrides):
        r = subprocess.run([sys.executable, "-m", "trainer", "ptq", f"model.name_or_path={teacher}",
                            f"output_dir={tmp_path / 'out'}", "ptq.progress=false", *overrides],
                           cwd=root, capture_output=True, text=True, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stderr
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr  # nothing loaded, nothing printed
        assert lines[0].startswith("distqat ptq: error: ")
        assert not (tmp_path / "out" / "model").exists()
        return lines[0]

    line = ptq("quant.scheme=w4g64", "ptq.method=gptq", f"ptq.calib_data={calib}", "ptq.calib_split=train",
               "ptq.n_samples=64", "ptq.seq_len=512")
    assert "fewer than ptq.n_samples * ptq.seq_len = 64 * 512 = 32768" in line
    line = ptq("ptq.n_samples=1000", "ptq.seq_len=512")  # the bundled calib split holds ~75k tokens
    assert "'bundled:wikitext' (split 'calib')" in line and "lower ptq.n_samples or ptq.seq_len" in line
    assert "hqq is weight-only" in ptq("quant.scheme=w4a8kv8", "ptq.method=hqq")
    assert "smoothquant migrates activation outliers" in ptq("quant.scheme=w4g64", "ptq.method=smoothquant")

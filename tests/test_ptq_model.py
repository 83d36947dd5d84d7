"""PTQ end to end on a tiny random Llama: folding, every method's model, save/load, convert, calibration,
bad input, one block on the device, and the `ptq` command line."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher
from torch import nn

from data.calib import calibration_ids
from qat.export import convert_folder
from qat.linear import QuantLinear
from qat.load import load
from qat.ptq import PTQConfig, parse_method, run_ptq
from qat.ptq.awq import search_scale
from qat.ptq.blocks import block_groups, capture_inputs, collect, fold, foldable
from qat.ptq.gptq import GPTQConfig
from qat.ptq.smoothquant import smooth_scales
from qat.spec import parse

F64 = torch.float64


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
    cfg = PTQConfig(method=method, progress=False, batch_size=2, gptq=GPTQConfig(act_order=method == "gptq"))
    model, report = run_ptq(model, parse(scheme), cfg, ids())
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
    again = load(tmp_path / "q")
    assert torch.equal(again(x).logits, out)
    if method != "llm_int8":
        for (_n, a), (_, b) in zip(model.named_modules(), again.named_modules()):
            if isinstance(a, QuantLinear):
                assert torch.equal(a.weight_quantizer.quantize(a.weight)[0], b.weight_quantizer.quantize(b.weight)[0])
        # The PTQ folder converts to integer weights that compute the same model.
        rt = load(convert_folder(tmp_path / "q", tmp_path / "int"))
        got = rt(x).logits
        if "a" in scheme.replace("asym", ""):  # int8 activations: integer accumulation vs fp32 matmul
            torch.testing.assert_close(got, out, rtol=0.02, atol=0.02 * out.abs().max().item())
        else:
            torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)


def test_gptq_clip_on_a_model_is_recorded_and_converts(tmp_path):
    """`ptq.gptq.clip` end to end: every layer's scales are at most min/max's, the folder records the GPTQ settings
    it was made with (the pipeline names its PTQ row from them), and it converts to the same model."""
    from qat.io.folders import inspect
    from trainer.pipeline import ptq_label

    x = ids(2, 16, seed=1)
    outs, scales = {}, {}
    for clip in (False, True):
        cfg = PTQConfig(method="gptq", progress=False, batch_size=2, gptq=GPTQConfig(clip=clip))
        model, _ = run_ptq(tiny_llama(), parse("w4"), cfg, ids())
        model.save_pretrained(tmp_path / str(clip))
        record = inspect(tmp_path / str(clip)).record
        assert record["gptq"]["clip"] is clip
        assert ptq_label(record["method"], record) == ("gptq, clip" if clip else "gptq")
        outs[clip] = model(x).logits
        scales[clip] = [m.weight_quantizer.quantize(m.weight)[1] for m in model.modules() if isinstance(m, QuantLinear)]
    assert all(bool((c <= m).all()) for c, m in zip(scales[True], scales[False]))
    assert sum(int((c < m).sum()) for c, m in zip(scales[True], scales[False])) > 0
    assert not torch.equal(outs[True], outs[False])
    rt = load(convert_folder(tmp_path / "True", tmp_path / "int"))
    torch.testing.assert_close(rt(x).logits, outs[True], rtol=1e-5, atol=1e-5)
    assert ptq_label("awq", {"gptq": {"clip": True}}) == "awq"  # no GPTQ in the method: nothing to name


def test_static_activation_scales_calibrated_block_by_block(tmp_path):
    from qat.quantizers import ActQuantizer
    from qat.spec import TensorSpec

    spec = parse("w8a8")
    spec.activation = TensorSpec(bits=8, granularity="tensor", dynamic=False)
    model, _ = run_ptq(tiny_llama(), spec, PTQConfig(method="smoothquant", progress=False), ids())
    statics = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    assert statics and all(float(m.scale) > 0 for m in statics)
    x = ids(2, 16, seed=1)
    model.save_pretrained(tmp_path / "s")
    assert torch.equal(load(tmp_path / "s")(x).logits, model(x).logits)


def test_gptq_beats_rtn_on_tiny_llama_layer_outputs():
    """Block-wise: the quantized model's last hidden state is closer to fp with GPTQ than with RTN."""
    x = ids(8, 32, seed=3)
    fp = tiny_llama().model(x).last_hidden_state
    errs = {}
    for method in ("rtn", "gptq"):
        m, _ = run_ptq(tiny_llama(), parse("w3g16"), PTQConfig(method=method, progress=False), x)
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
    cfg = PTQConfig(method="gptq", n_samples=4, seq_len=16, progress=False)
    calib = calibration_ids(CharTokenizer(), cfg.n_samples, cfg.seq_len, str(path), cfg.calib_split)
    model, report = run_ptq(tiny_llama(), parse("w4g16"), cfg, calib)
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
            return run_ptq(tiny_llama(), parse(scheme), PTQConfig(method=method, progress=False), calib)

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
    one_line_error(lambda: run_ptq(gemma, parse("w4"), PTQConfig(method="awq", progress=False), calib),
                   "cannot be folded")
    done, _ = run_ptq(tiny_llama(), parse("w4"), PTQConfig(method="rtn", progress=False))
    one_line_error(lambda: run_ptq(done, parse("w4"), PTQConfig(method="rtn")), "quantized already")


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
    run_ptq(model, parse("w4g16"), PTQConfig(method="gptq", progress=False, device="cpu"), ids())
    want = [(i, "cpu") for i in range(len(layers)) for _ in range(2)]
    assert events == want
    resident, peak = set(), 0
    for i, _ in events:
        resident ^= {i}  # to(device) adds, to(home) removes
        peak = max(peak, len(resident))
    assert peak == 1 and not resident


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_one_block_resident_on_cuda(method):
    """The model stays on the CPU; each block visits the GPU; the result matches a CPU run."""
    scheme = "w8a8" if method == "smoothquant" else "w4g16"
    x = ids()
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = PTQConfig(method=method, progress=False, device=device)
        model, _ = run_ptq(tiny_llama(), parse(scheme), cfg, x)
        assert all(p.device.type == "cpu" for p in model.parameters())
        runs[device] = model(x).logits.detach()
    torch.testing.assert_close(runs["cuda"], runs["cpu"], rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------------------
# `python -m trainer ptq`: bad input stops in one line, before the model loads.


def test_cli_bad_inputs_one_line_before_loading(tmp_path, bundled_tokenizer):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    teacher = save_tiny_teacher(tmp_path / "teacher", bundled_tokenizer)
    calib = tmp_path / "calib.txt"
    calib.write_text("A short calibration text of a few dozen tokens, far fewer than asked for.\n" * 3)

    def ptq(*overrides):
        r = subprocess.run([sys.executable, "-m", "trainer", "ptq", PUBLISHED, f"model.name_or_path={teacher}",
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


def test_generated_calibration_text_is_the_models_own_greedy_then_sampled(tiny_model):
    import warnings

    model = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the cache goes in under the installed transformers' name
        ids = calibration_ids(None, 5, 10, path="generate", model=model, seed=3)
        again = calibration_ids(None, 5, 10, path="generate", model=model, seed=3)
    assert ids.shape == (5, 10) and torch.equal(ids, again)  # the seed decides the text
    assert not torch.equal(ids, calibration_ids(None, 5, 10, path="generate", model=model, seed=4))
    with torch.no_grad():  # the 3 greedy steps after the random first token are the full forward's argmax
        for pos in range(1, 4):
            assert torch.equal(ids[:, pos], model(ids[:, :pos]).logits[:, -1].argmax(-1))

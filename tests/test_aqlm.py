"""AQLM: the algorithm on float64 toy layers, its beam search against brute force, the saved folder (distqat's
reference runtime, transformers + `aqlm`), and `ptq.method=aqlm` through the command line."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import PUBLISHED
from helpers.models import save_tiny_teacher

from qat.load import Kind, inspect, load
from qat.ptq import PTQConfig, run_ptq
from qat.ptq.aqlm import AQLMConfig, aqlm, beam_search, reconstruct
from qat.ptq.grid import output_error, rtn
from qat.runtime.aqlm import AQLMLinear, dequantize, pack_codes, unpack_codes
from qat.spec import parse

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def correlated(n=256, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d, dtype=F64) + torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    x = torch.randn(n, d, generator=g, dtype=F64) @ mix
    x[:, :4] *= 8.0  # a few outlier channels, as in LLM activations
    return x


def toy(out=128, d=64):
    x = correlated(d=d)
    w = torch.randn(out, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    return w, x.T @ x / len(x)


def bits(out, d, m, b, g=8, value_bits=16):
    """AQLM's bits per weight: codes, codebooks and one scale per output channel, values stored in 16 bits."""
    return (out * (d // g) * m * b + m * (1 << b) * g * value_bits + out * value_bits) / (out * d)


def test_objective_falls_every_iteration_and_beats_rtn_with_fewer_bits():
    """2 codebooks of 16 codewords of 8 weights on a 128x64 layer: 1 bit of codes + 0.5 of codebooks + 0.25 of
    scales = 1.75 bits a weight. RTN at 2 bits with a 16-bit scale per group of 16 (3 bits a weight; asymmetric
    with a 2-bit zero 3.125) has more bits and still a larger output error."""
    w, h = toy()
    cfg = AQLMConfig(num_codebooks=2, nbits_per_codebook=4, beam_size=4, iterations=4, adam_steps=30, lr=1e-2, damp=0)
    r = aqlm(w, h, cfg)
    hist = r.history
    assert len(hist) == cfg.iterations + 1
    assert all(b <= a * (1 + 1e-12) for a, b in zip(hist, hist[1:])), hist
    assert hist[-1] < 0.6 * hist[0]
    err = output_error(w, r.weight(), h)
    assert err == pytest.approx(hist[-1], rel=1e-9)
    assert bits(128, 64, 2, 4) == 1.75
    for scheme, rtn_bits in (("w2g16", 3.0), ("w2g16asym", 3.125)):
        assert bits(128, 64, 2, 4) < rtn_bits
        assert err < 0.8 * output_error(w, rtn(w, parse(scheme).weight)[0].double(), h), scheme


def test_beam_search_finds_the_exhaustive_optimum():
    """One codebook of 4 codewords, 3 groups a row: 64 assignments a row, all enumerated. A beam of 16 (= 4^2)
    keeps every prefix, so it must find each row's optimum; a beam of 1 (greedy) never does worse than the start."""
    g = torch.Generator().manual_seed(3)
    out, d, k = 5, 24, 4
    x = torch.randn(64, d, generator=g, dtype=F64) @ (torch.eye(d, dtype=F64) + 0.5 * torch.randn(d, d, generator=g,
                                                                                                      dtype=F64))
    h = x.T @ x / len(x)
    w = torch.randn(out, d, generator=g, dtype=F64)
    books = torch.randn(1, k, 8, generator=g, dtype=F64)
    scales = torch.rand(out, generator=g, dtype=F64) + 0.5
    start = torch.randint(k, (out, 3, 1), generator=g)

    def loss(codes):
        return (((w - scales[:, None] * reconstruct(codes, books)) @ h) * (w - scales[:, None] * reconstruct(codes,
                                                                                                            books))).sum(-1)

    every = torch.tensor(list(itertools.product(range(k), repeat=3)))  # (64, 3)
    best = torch.stack([torch.stack([loss(c.reshape(1, 3, 1).expand(out, 3, 1))[r] for c in every]).min()
                        for r in range(out)])
    found = beam_search(w, h, start, books, scales, 0, beam=16)
    torch.testing.assert_close(loss(found), best, rtol=1e-12, atol=1e-12)
    greedy = beam_search(w, h, start, books, scales, 0, beam=1)
    assert bool((loss(greedy) <= loss(start) + 1e-12).all())


def test_codes_pack_as_aqlm_stores_them():
    c = torch.arange(256).reshape(8, 4, 8 // 8 * 8)[..., :2]
    packed = pack_codes(c, 8)
    assert packed.dtype == torch.int8 and int(packed.min()) < 0
    assert torch.equal(unpack_codes(packed, 8), c)
    wide = torch.tensor([0, 40000, 65535])
    assert pack_codes(wide, 16).dtype == torch.int16
    assert torch.equal(unpack_codes(pack_codes(wide, 16), 16), wide)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


FAST = dict(num_codebooks=2, nbits_per_codebook=4, beam_size=2, iterations=1, kmeans_iters=3, adam_steps=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama through ptq.method=aqlm (2x4: aqlm's CPU path for it needs no numba), saved."""
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = PTQConfig(method="aqlm", progress=False, device="cpu")
    cfg.aqlm = AQLMConfig(**FAST)
    model, report = run_ptq(tiny_llama(), parse("w2"), cfg, ids)
    path = tmp_path_factory.mktemp("aqlm") / "model"
    model.save_pretrained(path)
    return path, model, report, ids


def test_run_ptq_codes_every_decoder_linear_and_counts_bits(saved):
    path, model, report, ids = saved
    coded = [m for m in model.modules() if isinstance(m, AQLMLinear)]
    assert len(coded) == 14  # 7 linears x 2 layers; lm_head stays
    d = report.to_dict()["aqlm"]
    assert len(d["layers"]) == 14
    for layer in d["layers"]:
        hist = layer["objective"]
        assert all(b <= a * (1 + 1e-6) for a, b in zip(hist, hist[1:]))
    # 1 bit of codes; codebooks 2*16*8 fp32 values and 32-bit scales, over the layer's weights.
    q = model.model.layers[0].self_attn.q_proj
    assert d["layers"][0]["bits_per_weight"] == pytest.approx((64 * 8 * 8 + 2 * 16 * 8 * 32 + 64 * 32) / 64 / 64)
    assert torch.equal(q.weight(), dequantize(q.codes, q.codebooks, q.scales))
    folder = inspect(path)
    assert folder.kind is Kind.AQLM and folder.record["bits_per_weight"] == pytest.approx(d["bits_per_weight"])
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "aqlm" and qc["num_codebooks"] == 2 and qc["nbits_per_codebook"] == 4
    assert "lm_head" in qc["linear_weights_not_to_quantize"]
    again = load(path)
    assert isinstance(again.model.layers[1].mlp.down_proj, AQLMLinear)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.skipif(importlib.util.find_spec("aqlm") is None, reason="the aqlm package is not installed")
def test_transformers_with_aqlm_loads_the_folder_and_matches_the_reference(saved):
    path, model, _, ids = saved
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    from aqlm import QuantizedLinear  # lazy: an optional package, skipped above when absent

    assert isinstance(hf.model.layers[0].self_attn.q_proj, QuantizedLinear)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_cli_ptq_aqlm_writes_a_folder_load_reads(tmp_path, bundled_tokenizer):
    teacher = save_tiny_teacher(tmp_path / "teacher", bundled_tokenizer)
    out = tmp_path / "out"
    knobs = [f"ptq.aqlm.{k}={v}" for k, v in FAST.items()]
    r = subprocess.run([sys.executable, "-m", "trainer", "ptq", PUBLISHED,
                        f"model.name_or_path={teacher}", f"output_dir={out}",
                        "quant.scheme=w2", "ptq.method=aqlm", "ptq.progress=false", "ptq.n_samples=4",
                        "ptq.seq_len=32", *knobs], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "ptq_report.json").read_text())
    assert report["method"] == "aqlm" and 1.0 < report["aqlm"]["bits_per_weight"] < 8.0
    model = load(out / "model")
    assert inspect(out / "model").kind is Kind.AQLM
    assert sum(isinstance(m, AQLMLinear) for m in model.modules()) == 14
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_one_codebook_of_16_bits_codes_in_int16():
    """The paper's 1x16 setting on a layer too small for it: int16 codes, the layer reproduces the result."""
    w, h = toy(out=4, d=16)
    r = aqlm(w, h, AQLMConfig(num_codebooks=1, nbits_per_codebook=16, iterations=1, kmeans_iters=1, adam_steps=2))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(r.history, r.history[1:]))
    layer = AQLMLinear.from_codes(r.codes, r.codebooks, r.scales, None, F64, 16)
    assert layer.codes.dtype == torch.int16 and layer.codebooks.shape == (1, 65536, 1, 8)
    torch.testing.assert_close(layer.weight(), r.weight(), rtol=0, atol=0)

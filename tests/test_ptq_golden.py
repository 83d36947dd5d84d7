"""RTN and GPTQ at w4g64 on fixed calibration give bit-identical quantized weights, codes, scales and zero
points across refactors: tests/data/ptq_golden_w4g64.json holds SHA-256 prefixes of each frozen linear,
recorded by this test's own computation on the tree before the re-layout (commit 04bc59d)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers

from qat.linear import QuantLinear
from qat.ptq import PTQConfig, run_ptq
from qat.spec import parse

GOLDEN = Path(__file__).parent / "data" / "ptq_golden_w4g64.json"


def tiny(dtype: torch.dtype) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def digest(t):
    if t is None:
        return None
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def fingerprint(model) -> dict:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            codes, _, _ = m.weight_quantizer.quantize(m.weight)
            q = m.weight_quantizer
            out[name] = {"weight": digest(m.weight), "codes": digest(codes), "scale": digest(q.scale),
                         "zero": digest(q.zero)}
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_ptq_w4g64_bit_identical_to_the_recorded_run(method, dtype):
    ids = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(0))
    model = tiny(getattr(torch, dtype))
    model, _ = run_ptq(model, parse("w4g64"), PTQConfig(method=method, progress=False, batch_size=4), ids)
    want = json.loads(GOLDEN.read_text())[f"{method}/{dtype}"]
    got = fingerprint(model)
    assert len(got) == 14
    assert got == want

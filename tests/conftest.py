"""Fixtures and pytest's hooks (the helpers test modules share are in tests/helpers/)."""

import importlib
import time
from collections import Counter

import pytest
import torch
from helpers import LANE
from helpers.models import tiny_config

# The Triton launchers behind each dispatcher's device branch (and tinygemm's, which runs aten's CPU variant on
# CPU tensors): `kernel_calls` counts their calls, so a lane test can assert that its branch really ran.
LAUNCHERS = {
    "fake_quant": ("qat.kernels.fake_quant", "fake_quant_rows"),
    "fp4_fake_quant": ("qat.kernels.fp4_quant", "fp4_fake_quant_rows"),
    "norm_quant": ("qat.kernels.norm_quant", "rms_norm_quant_rows"),
    "dequantize": ("qat.runtime.triton_ops", "dequantize"),
    "linear_a16": ("qat.runtime.triton_ops", "linear_a16"),
    "linear_gemv": ("qat.runtime.triton_ops", "linear_gemv"),
    "quantize_act_int8": ("qat.runtime.triton_ops", "quantize_act_int8"),
    "linear_a8": ("qat.runtime.triton_ops", "linear_a8"),
    "tinygemm": ("qat.runtime.int_kernels", "linear_tinygemm"),
}


def pytest_collection_modifyitems(config, items):
    """GPU-only tests carry @pytest.mark.cuda, and skip here without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m cuda runs these on one)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def kernel_calls(monkeypatch) -> Counter:
    """{launcher name: calls during this test}; empty on CPU outside the lane, where no device branch runs."""
    calls: Counter = Counter()
    if not (LANE or torch.cuda.is_available()):
        return calls
    for name, (module, attr) in LAUNCHERS.items():
        mod = importlib.import_module(module)
        real = getattr(mod, attr)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, attr, spy)
    return calls


@pytest.fixture
def no_interpreter(request, monkeypatch):
    """CPU tensors take the reference path, but in the device lane's own tests, whose device branch is the point
    (autouse in the integer runtime's test modules, through their pytestmark)."""
    if not (LANE and request.node.get_closest_marker("lane")):
        monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def tiny_model():
    def make(family: str = "llama", attn: str = "sdpa", seed: int = 0):
        cls, cfg = tiny_config(family)
        cfg._attn_implementation = attn
        torch.manual_seed(seed)
        return cls(cfg).eval()

    return make


@pytest.fixture(scope="session")
def bundled_path():
    from qat.io.models import bundled_model_path

    return bundled_model_path()


@pytest.fixture(scope="session")
def bundled_tokenizer(bundled_path):
    from qat.io.models import load_tokenizer

    return load_tokenizer("bundled:smollm2-135m")


@pytest.fixture(scope="session")
def wiki_test_windows(bundled_tokenizer):
    """8 windows of 1,024 tokens spread evenly over the bundled Wikipedia test split (what eval scores)."""
    from data.sources import load_texts, spread_windows, token_stream

    return spread_windows(token_stream(load_texts("bundled:wikitext", "test"), bundled_tokenizer), 1024, 8192)


@pytest.fixture(scope="session")
def fp_ppl(bundled_path, wiki_test_windows):
    from qat.io.models import load_model
    from trainer.eval import perplexity

    t0 = time.perf_counter()
    model = load_model("bundled:smollm2-135m", dtype="float32")
    return perplexity(model, wiki_test_windows, progress=False), time.perf_counter() - t0

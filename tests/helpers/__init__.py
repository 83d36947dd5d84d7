"""What several test modules share, in one place (tests/conftest.py keeps the fixtures and pytest's hooks; no test
module imports another test module or conftest, tests/test_layout.py holds that):

- here: the offline switches, and the device lane's markers;
- helpers.models: tiny models and the folders built from them;
- helpers.readers: a converted folder as the standard readers (compressed-tensors, transformers, vLLM) see it;
- helpers.quant_ref: the float64 reference of qat.quantizers and its deterministic inputs;
- helpers.int_ref: the integer runtime's test inputs and exact integer sums.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from qat.device import interpret_mode

# Everything runs offline: a test that reaches for a hub fails instead of downloading. Set on importing this
# package, before anything loads huggingface_hub or transformers (which read them once): conftest imports it first,
# and a submodule of it (helpers.models) always runs this file first.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The device lane: the second run of `./launch.sh test`, `TRITON_INTERPRET=1 pytest -m lane`. Triton then runs its
# kernels on CPU tensors, so every dispatcher that asks `qat.device.device_path` takes the branch a GPU takes; the
# tests marked `lane` run again there and compare that branch with the reference on tiny shapes.
LANE = interpret_mode()

# The run config's defaults before they became the recommended recipe (issue 26): tests written against them load
# this recipe first, so they test what they tested.
PUBLISHED = str(Path(__file__).resolve().parents[1] / "data" / "published.yaml")

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def lane_only(test):
    """A test of a Triton kernel itself, on CPU tensors: it runs in the device lane, where the interpreter is on."""
    skip = pytest.mark.skipif(not LANE, reason="runs in the device lane: TRITON_INTERPRET=1 pytest -m lane")
    return pytest.mark.lane(skip(test))


def needs_cuda(test):
    """A GPU-only test of a Triton kernel (conftest skips @pytest.mark.cuda without a GPU)."""
    return pytest.mark.cuda(needs_triton(test))

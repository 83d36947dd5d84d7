"""Post-training quantization baselines on one block-by-block calibration loop.

    from qat.ptq import PTQConfig, run_ptq
    model, report = run_ptq(model, qat.spec.parse("w4g64"), PTQConfig(method="gptq"), calib_ids)

Every method but the LLM.int8() baseline returns the model as `qat.apply.quantize_model` leaves it
(QuantLinear layers) with the weights on the PTQ grid and the scales/zeros frozen in lsq weight
quantizers, so `qat.load.load` reloads it and convert/eval read it like a QAT model. The methods are
parts (`parts.py`) listed in `registry.py`, one module each; their settings sections are in `config.py`.

The names below are imported when first used (PEP 562): the run-config schema imports `qat.ptq.config`, and
importing a package runs its `__init__`, which must not pull in torch for `distqat --help`.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "PTQConfig": "config", "METHODS": "config", "check": "loop", "needs_calibration": "loop", "run_ptq": "loop",
    "Baseline": "parts", "PTQReport": "parts", "Rounding": "parts", "Transform": "parts", "parse_method": "registry",
    "Int8OutlierLinear": "llm_int8",  # re-exported there from qat.runtime.llm_int8
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'qat.ptq' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


__all__ = sorted(_HOMES)

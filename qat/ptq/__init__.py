"""Post-training quantization baselines on one block-by-block calibration loop.

    from qat.ptq import PTQConfig, run_ptq
    model, report = run_ptq(model, qat.spec.parse("w4g64"), PTQConfig(method="gptq"), calib_ids)

Every method but the LLM.int8() baseline returns the model as `qat.apply.quantize_model` leaves it
(QuantLinear layers) with the weights on the PTQ grid and the scales/zeros frozen in lsq weight
quantizers, so `qat.load.load` reloads it and convert/eval read it like a QAT model. The methods are
parts (`parts.py`) listed in `registry.py`, one module each with its own config section.
"""

from ..runtime.llm_int8 import Int8OutlierLinear
from .config import PTQConfig
from .loop import check, needs_calibration, run_ptq
from .parts import Baseline, PTQReport, Rounding, Transform
from .registry import METHODS, parse_method

__all__ = [
    "METHODS", "Baseline", "PTQConfig", "PTQReport", "Int8OutlierLinear", "Rounding", "Transform", "check",
    "needs_calibration", "parse_method", "run_ptq",
]

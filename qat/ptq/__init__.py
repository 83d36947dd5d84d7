"""Post-training quantization baselines on one block-by-block calibration loop.

    from qat.ptq import PTQConfig, run_ptq
    model, report = run_ptq({"quant": "w4g64", "ptq": PTQConfig(method="gptq")}, model, tokenizer)

Every method except llm_int8 returns the model as `qat.apply.quantize_model` leaves it (QuantLinear
layers) with the weights on the PTQ grid and the scales/zeros frozen in lsq weight quantizers, so
`qat.apply.load_quantized_model` reloads it and convert/eval read it like a QAT model.
"""

from .config import METHODS, PTQConfig, parse_method
from .llm_int8 import Int8OutlierLinear, convert_llm_int8
from .loop import PTQ_KEY, PTQReport, run_ptq
from .run import load_ptq_model, ptq_command

__all__ = [
    "METHODS", "PTQConfig", "parse_method", "run_ptq", "PTQReport", "PTQ_KEY", "Int8OutlierLinear",
    "convert_llm_int8", "ptq_command", "load_ptq_model",
]

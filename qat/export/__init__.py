"""Conversion of fake-quantized models to integer checkpoints, and their integer runtime.

    distqat convert <model folder> --out <folder>      # or qat.export.convert_folder
    model = qat.load.load(<folder>)                    # or qat.export.load_quantized

Fused MoE experts convert per expert under the family's original checkpoint names (`experts.py`) and load as
`IntExperts`. fp8 (W8A8 e4m3) layers convert to the float-quantized layout (`fp8.py`). The layers a converted folder
runs as (`IntLinear`, `IntExperts`, `Fp8Linear`, the integer KV cache `IntKVCache`) and their kernels are
`qat.runtime`'s; the names stay importable from here, where users of the integer checkpoint have always found them.
"""

from ..runtime.fp8 import Fp8Linear
from ..runtime.int_experts import IntExperts
from ..runtime.int_linear import IntLinear
from ..runtime.kv_cache import IntKVCache
from .convert import convert_folder, convert_model
from .load import load_quantized

__all__ = ["convert_folder", "convert_model", "load_quantized", "IntLinear", "Fp8Linear", "IntKVCache", "IntExperts"]

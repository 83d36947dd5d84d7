"""Conversion of fake-quantized models to integer checkpoints, and their integer runtime.

    distqat convert <model folder> --out <folder>      # or qat.export.convert_folder
    model = qat.load.load(<folder>)                    # or qat.export.load_quantized

fp8 (W8A8 e4m3) layers convert to the float-quantized layout and run as `Fp8Linear` (`fp8.py`).
"""

from .cache import IntKVCache
from .convert import convert_folder, convert_model
from .fp8 import Fp8Linear
from .load import load_quantized
from .runtime import IntLinear

__all__ = ["convert_folder", "convert_model", "load_quantized", "IntLinear", "Fp8Linear", "IntKVCache"]

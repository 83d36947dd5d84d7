"""Conversion of fake-quantized models to integer checkpoints, and their integer runtime.

    distqat convert <model folder> --out <folder>      # or qat.export.convert_folder
    model = qat.export.load_quantized(<folder>)
"""

from __future__ import annotations

from typing import Any

__all__ = ["convert_folder", "convert_model", "load_quantized", "IntLinear", "IntKVCache"]


def __getattr__(name: str) -> Any:
    # Lazy: importing qat.export must not pull transformers' cache classes or Triton eagerly.
    if name in ("convert_folder", "convert_model"):
        from . import convert
        return getattr(convert, name)
    if name == "load_quantized":
        from .load import load_quantized
        return load_quantized
    if name == "IntLinear":
        from .runtime import IntLinear
        return IntLinear
    if name == "IntKVCache":
        from .cache import IntKVCache
        return IntKVCache
    raise AttributeError(name)

"""LLM.int8() (Dettmers et al. 2022) as a PTQ baseline: vector-wise int8 matmul with fp16 outlier decomposition.

The baseline swaps the linears its patterns select for `qat.runtime.llm_int8.Int8OutlierLinear` (the layer and its
matmul: int8 codes with absmax scales per input row and output channel, exact integer accumulation, input columns
above `threshold` in high precision) and records its settings in config.json, from which `restore` rebuilds the
layers. No calibration: the decomposition is decided per batch at run time. It is a baseline of its own rather
than a QuantLinear model: its fp16 outlier columns have no place in the fake-quant grid or the integer format.
"""

from __future__ import annotations

import time
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from torch import nn

from ..keys import LLM_INT8_KEY
from ..runtime.llm_int8 import Int8OutlierLinear
from ..spec import QuantSpec
from .config import LLMInt8Config
from .parts import Baseline, PTQReport


def convert_llm_int8(model: nn.Module, include: list[str], exclude: list[str], threshold: float = 6.0) -> list[str]:
    """Swap the model's linears (by include/exclude patterns) for Int8OutlierLinear; returns their names."""
    names = []
    for name, lin in [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]:
        if not any(fnmatchcase(name, p) for p in include) or any(fnmatchcase(name, p) for p in exclude):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8OutlierLinear.from_linear(lin, threshold))
        names.append(name)
    if not names:
        raise ValueError("ptq.method=llm_int8: no linear matched quant.include/exclude")
    return names


class LLMInt8(Baseline):
    name: ClassVar[str] = "llm_int8"

    def __init__(self, cfg: LLMInt8Config) -> None:
        self.cfg = cfg

    def check(self, spec: QuantSpec) -> None:
        """LLM.int8() is int8 symmetric per output channel and leaves the KV cache alone."""
        w = spec.weight
        if w is not None and (w.bits != 8 or w.format != "int" or not w.symmetric or w.granularity != "channel"):
            raise ValueError(
                "ptq.method=llm_int8 is int8 symmetric per output channel (vector-wise); set quant.scheme=w8a8 or w8"
            )
        if spec.kv is not None:
            raise ValueError("ptq.method=llm_int8 does not quantize the KV cache; set quant.kv=null")

    def quantize(self, model: nn.Module, spec: QuantSpec) -> tuple[nn.Module, PTQReport]:
        """LLM.int8() on the linears that `spec.include` / `spec.exclude` select; no calibration. The model's
        config records it under its own key, which `qat.io.folders.inspect` reads as its own kind."""
        t0 = time.perf_counter()
        names = convert_llm_int8(model, spec.include, spec.exclude, self.cfg.threshold)
        setattr(model.config, LLM_INT8_KEY, {"threshold": float(self.cfg.threshold), "include": list(spec.include),
                                             "exclude": list(spec.exclude)})
        report = PTQReport(method=self.name, spec=self.name, seconds=time.perf_counter() - t0)
        report.layers = [{"name": n, "seconds": 0.0, "algorithm": self.name} for n in names]
        return model, report


def restore(model: nn.Module, record: dict[str, Any]) -> nn.Module:
    """A saved LLM.int8() model's fp linears re-wrapped as Int8OutlierLinear, by its config record."""
    convert_llm_int8(model, record.get("include") or ["*"], record.get("exclude") or ["lm_head", "*.lm_head"],
                     record.get("threshold", 6.0))
    return model.eval()

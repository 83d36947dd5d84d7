"""The PTQ methods: which parts exist, how a `ptq.method` string composes them, and the whole-model baselines.

A method is one rounding (rtn, gptq, hqq) after any transforms (smoothquant, awq) in this order, e.g.
`awq+gptq`, all after the whole-model rotation when it is named (`rotate+gptq`); a bare transform rounds with
rtn. A baseline (llm_int8) replaces the model's linears on its own and composes with nothing. A new part is a
module with its algorithm and its `ModelTransform` / `Transform` / `Rounding` / `Baseline` class, listed here; its
name and its settings section go in `config.py` (light, for the run-config schema), checked against this list.
"""

from __future__ import annotations

from typing import Any, Union

from .aqlm import AQLM
from .awq import AWQ
from .config import (
    BASE_METHODS,
    BASELINE_NAMES,
    METHODS,
    MODEL_TRANSFORM_NAMES,
    ROUNDING_NAMES,
    TRANSFORM_NAMES,
)
from .gptq import GPTQ
from .hqq import HQQ
from .llm_int8 import LLMInt8
from .parts import Baseline, ModelTransform, Part, Rounding, Transform
from .rotate import Rotate
from .rtn import RTN
from .smoothquant import SmoothQuant

MODEL_TRANSFORMS: dict[str, type[ModelTransform]] = {c.name: c for c in (Rotate,)}  # before the block loop
TRANSFORMS: dict[str, type[Transform]] = {c.name: c for c in (SmoothQuant, AWQ)}  # in the order they apply
ROUNDINGS: dict[str, type[Rounding]] = {c.name: c for c in (RTN, GPTQ, HQQ, AQLM)}
BASELINES: dict[str, type[Baseline]] = {c.name: c for c in (LLMInt8,)}
PARTS: dict[str, type[Part]] = {**MODEL_TRANSFORMS, **TRANSFORMS, **ROUNDINGS, **BASELINES}
if (tuple(ROUNDINGS), tuple(TRANSFORMS), tuple(BASELINES), tuple(MODEL_TRANSFORMS)) != (
        ROUNDING_NAMES, TRANSFORM_NAMES, BASELINE_NAMES, MODEL_TRANSFORM_NAMES):
    raise ImportError("qat.ptq.config's part names differ from the classes in qat.ptq.registry; list each part in both")


def parse_method(method: Union[str, list, tuple]) -> list[str]:
    """'awq+gptq' or ['awq', 'gptq'] -> ['awq', 'gptq'] (the rotation, transforms, then one rounding); ValueError
    if invalid."""
    parts = [str(p).strip().lower() for p in (method if isinstance(method, (list, tuple)) else str(method).split("+"))]
    parts = [p for p in parts if p]
    bad = [p for p in parts if p not in BASE_METHODS]
    if bad or not parts:
        raise ValueError(f"ptq.method={method!r}: unknown method {bad[0] if bad else ''!r}; use one of {list(METHODS)}")
    baselines = [p for p in parts if p in BASELINES]
    if baselines and len(parts) > 1:
        raise ValueError(f"ptq.method={method!r}: {baselines[0]} is a baseline of its own and composes with nothing")
    if baselines:
        return parts
    rounders = [p for p in parts if p in ROUNDINGS]
    if len(rounders) > 1:
        raise ValueError(f"ptq.method={method!r}: pick one weight rounding of {list(ROUNDINGS)}, got {rounders}")
    transforms = [p for p in TRANSFORMS if p in parts]
    if rounders and not ROUNDINGS[rounders[0]].takes_transforms and transforms:
        raise ValueError(f"ptq.method={method!r}: {rounders[0]} takes no transform and does not compose with "
                         f"{transforms}")
    return [p for p in MODEL_TRANSFORMS if p in parts] + transforms + (rounders or ["rtn"])


def build(steps: list[str], cfg: Any) -> list[Part]:
    """The parts of a parsed method, each made with its own config section of `cfg` (a PTQConfig)."""

    def make(name: str) -> Part:
        section = getattr(cfg, name, None)
        return PARTS[name](section) if section is not None else PARTS[name]()

    return [make(s) for s in steps]

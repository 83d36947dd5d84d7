"""The parts a PTQ method is made of, and the report they fill.

The block loop (`loop.py`) first runs a `ModelTransform` (the rotation: it turns the whole model, embeddings
included, so it cannot go block by block), then composes at most one `Transform` per kind (SmoothQuant, AWQ:
rescale or clip weights against their calibration inputs, folding what they change into the op before them, so
the full-precision model computes the same function) and exactly one `Rounding` (RTN, GPTQ, HQQ: put each
weight on the integer grid and choose its scales). Each method is one module holding its algorithm, its
config dataclass (nested under `ptq.<name>` in the run config) and its part; `registry.py` lists them.
A `Baseline` (LLM.int8()) is a method of its own that no loop composes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch import nn

from ..linear import QuantLinear
from ..spec import QuantSpec, TensorSpec
from .blocks import Group
from .grid import freeze

# (dequantized weight in the weight's shape, int32 codes or None, scale rows, zero rows or None), the
# rows laid out as `qat.quantizers.weight_rows` of the spec: what `grid.freeze` stores.
Rounded = tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]


class Part(ABC):
    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = True  # needs the layers' calibration inputs
    needs_hessian: ClassVar[bool] = False  # needs H = X^T X / n of each group's input, not just |x| statistics
    handles_experts: ClassVar[bool] = False  # quantizes fused MoE experts too (others refuse a model that has them)

    def check(self, spec: QuantSpec) -> None:  # noqa: B027 - most parts accept every spec
        """Raise ValueError (one line) for a spec this part cannot produce."""


class Transform(Part):
    @abstractmethod
    def apply(self, layer: nn.Module, group: Group, specs: dict[str, TensorSpec]) -> list[str]:
        """Transform one group of linears sharing an input (statistics in `group.stats`); `specs` holds the
        quantized linears of the group. Returns the names of the linears it changed (for the report)."""


class ModelTransform(Part):
    """A whole-model transform that the block loop runs before its first block (the rotation): exact in full
    precision, it changes every layer and the embeddings at once, so it cannot go block by block."""

    needs_calibration: ClassVar[bool] = False

    @abstractmethod
    def apply_model(self, model: nn.Module, device: torch.device) -> dict:
        """Transform the full-precision model in place; returns the record a saved folder keeps of it."""


class Baseline(Part):
    """A whole-model method that replaces the linears on its own (LLM.int8()) and composes with nothing."""

    needs_calibration: ClassVar[bool] = False

    @abstractmethod
    def quantize(self, model: nn.Module, spec: QuantSpec) -> tuple[nn.Module, PTQReport]:
        """Quantize `model` in place; the model's config records the method under a key of its own."""


class Rounding(Part):
    takes_transforms: ClassVar[bool] = True  # may follow SmoothQuant / AWQ
    sequential: bool = False  # collect a group's inputs again once the groups before it are rounded
    moe_min_tokens_per_column: float = 0.0  # an expert routed fewer tokens per input column takes the pooled H
    # Its finished blocks are whole in their state dicts (a stopped run keeps them: progress.py); AQLM's are not.
    resumable: ClassVar[bool] = True

    @abstractmethod
    def round(self, weight: torch.Tensor, spec: TensorSpec, h: Optional[torch.Tensor],
              nvfp4_exp: Optional[torch.Tensor] = None) -> Rounded:
        """Round one weight (out, in) onto the spec's grid; `h` is its input's H when `needs_hessian`;
        `nvfp4_exp` the NVFP4 tensor-scale exponent it shares with other weights (one expert of a fused experts
        parameter: `qat.ptq.fp4grid`), None: its own. Int grids ignore it."""

    def freeze(self, layer: nn.Module, name: str, q: QuantLinear, rounded: Rounded) -> None:
        """Store `round`'s result in the layer's linear `name` (q); a rounding off the grid (AQLM) replaces q."""
        freeze(q, rounded[0], rounded[2], rounded[3])

    def finish(self, model: nn.Module, report: PTQReport) -> None:  # noqa: B027 - most roundings need nothing
        """Once every block is done: record what the model's config needs beyond the spec."""


@dataclass
class PTQReport:
    method: str
    spec: str
    blocks: list[dict] = field(default_factory=list)  # index, seconds
    layers: list[dict] = field(default_factory=list)  # name, seconds, algorithm ("awq+gptq")
    calib_tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # a method's own results (AQLM: bits per weight)

    def add(self, name: str, seconds: float, algorithm: str) -> None:
        """Count `seconds` of `algorithm` on layer `name`; a later part of the method extends its record."""
        for d in self.layers:
            if d["name"] == name:
                d["seconds"] += seconds
                d["algorithm"] += "+" + algorithm
                return
        self.layers.append({"name": name, "seconds": seconds, "algorithm": algorithm})

    def annotate(self, name: str, **fields) -> None:
        """Add a method's own results to layer `name`'s record (MoE experts: routed tokens, fallbacks)."""
        for d in self.layers:
            if d["name"] == name:
                d.update(fields)

    def to_dict(self) -> dict:
        return {"method": self.method, "spec": self.spec, "calib_tokens": self.calib_tokens,
                "seconds": self.seconds, "blocks": self.blocks, "layers": self.layers, **self.extra}

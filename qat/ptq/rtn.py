"""Round-to-nearest: every weight to its nearest grid point, scales from the spec's scale method."""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from ..spec import TensorSpec
from .grid import rtn
from .parts import Rounded, Rounding


class RTN(Rounding):
    name: ClassVar[str] = "rtn"
    handles_experts: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False

    def round(self, weight: torch.Tensor, spec: TensorSpec, h: Optional[torch.Tensor],
              nvfp4_exp: Optional[torch.Tensor] = None) -> Rounded:
        return rtn(weight, spec, weight.dtype, nvfp4_exp)

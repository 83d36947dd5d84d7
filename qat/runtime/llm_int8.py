"""LLM.int8() (Dettmers et al. 2022) at run time: vector-wise int8 matmul with fp16 outlier decomposition.

Input columns (features) whose magnitude exceeds `threshold` in any row run in high precision
(fp16 on CUDA, fp32 on CPU) against the weight's original columns; the rest are quantized to int8
with one absmax scale per row of the input and one per output channel of the weight, multiplied
with integer accumulation, and rescaled. The CPU reference accumulates exactly (int8 products
summed in float64, exact below 2^53); the CUDA path uses torch._int_mm (int32 accumulation) when
the shapes allow it, and fp16 outliers. The decomposition is decided per batch at run time. The baseline that
swaps a model's linears for `Int8OutlierLinear` and records its folder is `qat.ptq.llm_int8`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..device import device_path

__all__ = ["EPS", "Int8OutlierLinear", "int8_rows", "int_matmul"]

EPS = 1e-8


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row: (codes as int8, fp32 scale (rows, 1))."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / 127.0).clamp_min(EPS)
    return torch.round(xf / scale).clamp(-127, 127).to(torch.int8), scale


def int_matmul(a: torch.Tensor, b: torch.Tensor, fast: bool) -> torch.Tensor:
    """a (m, k) int8 @ b (n, k)^T int8 with exact integer accumulation.

    fast: torch._int_mm (int32 accumulation, cuBLAS on CUDA) where it takes the shape, as int32;
    otherwise the products are summed in float64 (exact below 2^53).
    """
    if fast and a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0:
        try:
            return torch._int_mm(a.contiguous(), b.t())
        except RuntimeError:  # a build or device without an int8 GEMM for this shape
            pass
    return a.double() @ b.double().t()


class Int8OutlierLinear(nn.Linear):
    """nn.Linear whose forward is LLM.int8(): int8 vector-wise matmul plus a high-precision outlier part.

    The fp weight stays the Parameter (state_dict as nn.Linear); its int8 codes are cached per weight version.
    `fast_path` None picks the arithmetic by device: on CUDA int32 accumulation, fp32 rescaling and fp16
    outliers (the paper's), on CPU the exact float64 reference. True/False force one (tests run the
    CUDA arithmetic on CPU, where torch._int_mm exists too).
    """

    fast_path: Optional[bool] = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.threshold = float(threshold)
        self._cache: Optional[tuple] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> Int8OutlierLinear:
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight, m.bias = linear.weight, linear.bias
        m.threshold, m._cache = float(threshold), None
        return m

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, *int8_rows(self.weight.detach()))
        return self._cache[1], self._cache[2]

    def outlier_columns(self, x2: torch.Tensor) -> torch.Tensor:
        return (x2.abs() > self.threshold).any(0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        cols = self.outlier_columns(x2)
        wq, ws = self.int8_weight()
        xq, xs = int8_rows(x2.masked_fill(cols, 0))
        fast = device_path(x, "int_mm") if self.fast_path is None else self.fast_path
        acc = torch.float32 if fast else torch.float64
        y = int_matmul(xq, wq, fast).to(acc) * xs.to(acc) * ws.t().to(acc)
        if bool(cols.any()):
            # High-precision part: fp16 as in the paper, or the input's precision (>= fp32) in the reference.
            hp = torch.float16 if fast else (torch.float64 if x.dtype == torch.float64 else torch.float32)
            y = y + (x2[:, cols].to(hp) @ self.weight[:, cols].to(hp).t()).to(acc)
        if self.bias is not None:
            y = y + self.bias.to(acc)
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 vector-wise, outlier threshold={self.threshold}"

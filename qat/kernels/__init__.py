"""Fused Triton kernels for CUDA; the reference ops in qat.quantizers are the fallback and the oracle.

`fused_fake_quant_rows` is what `qat.quantizers.fake_quant` calls for the min/max integer path on
CUDA. It runs on CPU tensors too when TRITON_INTERPRET=1 is set before triton is first imported
(the Triton interpreter, for tests on machines without a GPU).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
_HAVE_TRITON: Optional[bool] = None


def interpret_mode() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1), which accepts CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    global _HAVE_TRITON
    if _HAVE_TRITON is None:
        _HAVE_TRITON = importlib.util.find_spec("triton") is not None
    return _HAVE_TRITON


def fused_fake_quant_rows(
    rows: torch.Tensor, bits: int, symmetric: bool, scale_dtype: Optional[torch.dtype]
) -> Optional[torch.Tensor]:
    """Fake-quantize each row with its min/max scale in one pass; None where no kernel applies.

    rows: (R, n) bf16/fp16/fp32, 1 <= n <= 32768, on CUDA (or any device in interpret mode).
    Returns a new contiguous tensor of rows' shape and dtype, bit-identical to
    `qat.quantizers.fake_quant(rows, spec, scale_dtype, use_kernel=False)` for an int min/max spec
    with these bits and symmetry; it carries no autograd graph (the caller wraps it in an STE).
    """
    if rows.dim() != 2 or rows.dtype not in _DTYPES or scale_dtype not in _SCALE_DTYPES:
        return None
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        return None
    if not (rows.is_cuda or interpret_mode()) or not triton_available():
        return None
    # lazy: triton.jit reads TRITON_INTERPRET when the kernel is defined, and triton is optional on CPU
    from .fake_quant import MAX_N, fake_quant_rows

    if not 1 <= rows.shape[1] <= MAX_N:
        return None
    return fake_quant_rows(rows, bits, bool(symmetric), scale_dtype)


__all__ = ["fused_fake_quant_rows", "interpret_mode", "triton_available"]

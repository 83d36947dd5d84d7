"""Fused Triton kernels for CUDA; the reference ops in qat.quantizers are the fallback and the oracle.

`fused_fake_quant_rows` is what `qat.quantizers.fake_quant` calls for the min/max integer path on
CUDA; `fused_rms_norm_quant` is the RMSNorm + per-token fake quant of `qat.fast`'s norm_quant. Both run
on CPU tensors too when TRITON_INTERPRET=1 is set before triton is first imported (the Triton
interpreter, for tests on machines without a GPU); `qat.device.device_path` says which.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..device import device_path, interpret_mode, triton_available

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def _kernel_runs(t: torch.Tensor, bits: int, op: str) -> bool:
    """Whether kernel `op` of this package can take `t` at `bits`: 2-8 integer bits, on its device path."""
    return isinstance(bits, int) and 2 <= bits <= 8 and device_path(t, op)


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
    if not _kernel_runs(rows, bits, "fake_quant"):
        return None
    # lazy: triton.jit reads TRITON_INTERPRET when the kernel is defined, and triton is optional on CPU
    from .fake_quant import MAX_N, fake_quant_rows

    if not 1 <= rows.shape[1] <= MAX_N:
        return None
    return fake_quant_rows(rows, bits, bool(symmetric), scale_dtype)


def fused_rms_norm_quant(
    x: torch.Tensor, weight: torch.Tensor, eps: float, bits: int, symmetric: bool,
    out_dtype: Optional[torch.dtype] = None, store_y: bool = False,
) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """LlamaRMSNorm of each row of x (R, N) with `weight` (N,), then its per-row int min/max fake quant, in one
    pass; None where no kernel applies (CPU without the interpreter, no triton, unsupported dtypes or sizes).

    Returns (out, rstd, y): out in `out_dtype` (default: the norm's output dtype, torch's promotion of x and
    weight), rstd (R,) fp32 for the backward pass, and the norm's output y when `store_y` (else None). y
    matches torch's norm to rounding (another summation order); out is bit for bit
    `fake_quant(y.to(out_dtype), spec, use_kernel=False)`. No autograd graph (qat.fast wraps it).
    """
    if x.dim() != 2 or weight.dim() != 1 or x.shape[1] != weight.shape[0] or x.device != weight.device:
        return None
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES or out_dtype not in _SCALE_DTYPES:
        return None
    if not _kernel_runs(x, bits, "norm_quant"):
        return None
    # lazy: triton.jit reads TRITON_INTERPRET when the kernel is defined, and triton is optional on CPU
    from .norm_quant import MAX_N, rms_norm_quant_rows

    if not 1 <= x.shape[1] <= MAX_N:
        return None
    return rms_norm_quant_rows(x, weight, eps, bits, bool(symmetric), out_dtype, store_y)


__all__ = ["fused_fake_quant_rows", "fused_rms_norm_quant", "interpret_mode", "triton_available"]

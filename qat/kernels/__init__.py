"""Fused Triton kernels for CUDA; the reference ops in qat.quantizers are the fallback and the oracle.

`fused_fake_quant_rows` and `fused_fp4_fake_quant_rows` are what `qat.quantizers.fake_quant` calls for the
min/max integer and NVFP4 / MXFP4 paths on CUDA; `fused_rms_norm_quant` is the RMSNorm + per-token fake quant
of `qat.fast`'s norm_quant. All run on CPU tensors too when TRITON_INTERPRET=1 is set before triton is first
imported (the Triton interpreter, for tests on machines without a GPU); `qat.device.device_path` says which.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..device import device_path, interpret_mode, triton_available
from ..fp4 import FP4_BLOCK, FP4_MAX

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def _kernel_runs(t: torch.Tensor, bits: int, op: str) -> bool:
    """Whether kernel `op` of this package can take `t` at `bits`: 2-8 integer bits, on its device path."""
    return isinstance(bits, int) and 2 <= bits <= 8 and device_path(t, op)


def fused_fake_quant_rows(
    rows: torch.Tensor, bits: int, symmetric: bool, scale_dtype: Optional[torch.dtype], sym_range: str = "full",
) -> Optional[torch.Tensor]:
    """Fake-quantize each row with its min/max scale in one pass; None where no kernel applies.

    rows: (R, n) bf16/fp16/fp32, 1 <= n <= 32768, on CUDA (or any device in interpret mode).
    Returns a new contiguous tensor of rows' shape and dtype, bit-identical to
    `qat.quantizers.fake_quant(rows, spec, scale_dtype, use_kernel=False)` for an int min/max spec
    with these bits, symmetry and `sym_range` (signed, full or qmax); it carries no autograd graph (the caller
    wraps it in an STE).
    """
    if rows.dim() != 2 or rows.dtype not in _DTYPES or scale_dtype not in _SCALE_DTYPES:
        return None
    if not _kernel_runs(rows, bits, "fake_quant"):
        return None
    # lazy: triton.jit reads TRITON_INTERPRET when the kernel is defined, and triton is optional on CPU
    from .fake_quant import MAX_N, fake_quant_rows

    if not 1 <= rows.shape[1] <= MAX_N:
        return None
    return fake_quant_rows(rows, bits, bool(symmetric), scale_dtype, sym_range)


class Fp4FakeQuant(torch.autograd.Function):
    """The kernel's output in forward; in backward the reference's clamp-aware STE (qat.quantizers.
    fake_quant_values through autograd: values beyond +-6 block scales get no gradient), op for op, so the
    gradient is bit-identical too: (where(|x / eff| <= 6, g * eff, 0) / eff) in fp32, cast to x's dtype."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, out: torch.Tensor, eff: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows, eff)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        rows, eff = ctx.saved_tensors
        y = rows.float() / eff
        keep = (y >= -FP4_MAX) & (y <= FP4_MAX)  # torch.clamp's backward: NaN gets no gradient
        grad = torch.where(keep, g.float() * eff, torch.zeros((), dtype=torch.float32, device=g.device)) / eff
        return grad.to(rows.dtype), None, None


def fused_fp4_fake_quant_rows(
    rows: torch.Tensor, fmt: str, global_rows: Optional[int] = None
) -> Optional[torch.Tensor]:
    """NVFP4 / MXFP4 fake quant of block rows (R, 16) / (R, 32) in one pass; None where no kernel applies.

    Bit-identical to `qat.quantizers.fake_quant(rows, spec, use_kernel=False, global_rows=global_rows)` for a
    min/max spec of format `fmt`, forward and gradient (`Fp4FakeQuant`); `global_rows` consecutive blocks share
    one NVFP4 tensor scale (None: all of them). The reference handles what this does not take (other dtypes,
    shapes, R not a multiple of global_rows: its error).
    """
    if fmt not in FP4_BLOCK or rows.dim() != 2 or rows.dtype not in _DTYPES or rows.shape[1] != FP4_BLOCK[fmt]:
        return None
    if global_rows is not None and (global_rows < 1 or rows.shape[0] % global_rows):
        return None
    if not device_path(rows, "fake_quant"):
        return None
    # lazy: triton.jit reads TRITON_INTERPRET when the kernel is defined, and triton is optional on CPU
    from .fp4_quant import fp4_fake_quant_rows

    out, eff = fp4_fake_quant_rows(rows, fmt == "mxfp4", global_rows)
    return Fp4FakeQuant.apply(rows, out, eff)


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


__all__ = ["Fp4FakeQuant", "fused_fake_quant_rows", "fused_fp4_fake_quant_rows", "fused_rms_norm_quant",
           "interpret_mode", "triton_available"]

"""The kernels of the integer runtime's ops (`qat.runtime.ops`), one `KernelRegistry` per op, and the table that
picks a W*A16 / W*A8 kernel by path and number of tokens (`DISPATCH`).

Ops and their kernels (names as `impl=` and `DISPATCH` use them):
- `LINEAR_A16`, the W*A16 linear: tinygemm, gemv, triton, dequant, reference;
- `LINEAR_A8`, the W*A8 linear (after the activation's int8 codes): triton, int_mm, dequant, reference;
- `DEQUANTIZE`, the weight in a float dtype: triton, reference;
- `QUANTIZE_ACT`, per-token int8 activation codes: triton, reference.
Each kernel's predicate asks `qat.device.device_path` (through `_use_triton`, `_fallback`, `_int_mm_runs`,
`tinygemm_supported`) where it runs and checks the shape and dtype; one that is not available falls back as the
registry says. DISTQAT_INT_KERNELS=0 (`kernels_enabled`) sends every op to its reference.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..device import device_path
from .reference import (
    a8_epilogue_reference,
    dequantize_reference,
    group_accumulate_reference,
    quantize_act_reference,
)
from .registry import KernelRegistry
from .tinygemm import linear_tinygemm, tinygemm_supported

__all__ = [
    "DISPATCH", "IMPLS", "KERNELS_ENV", "kernels_enabled", "path_name", "choose_impl", "IntCall", "Weight",
    "LINEAR_A16", "LINEAR_A8", "DEQUANTIZE", "QUANTIZE_ACT", "dequantize", "tinygemm_supported",
]

KERNELS_ENV = "DISTQAT_INT_KERNELS"

# Which implementation runs on CUDA, per path and number of tokens M: the first (max_m, impl) entry
# with M <= max_m wins. Implementations:
#   tinygemm w4a16, 4-bit weights only: torch.ops.aten._weight_int4pack_mm (the tinygemm kernel of
#            gpt-fast / torchao), bf16 activations and bf16 scales, groups of 32/64/128/256, K a
#            multiple of 32, N of 16. The weight is repacked once per layer (cached on the qweight tensor) and
#            checked against the dequantized reference on a probe input before first use; where the
#            check fails (or the op is missing) a warning is given once and it is never used again.
#            Not bit-exact for asymmetric grids: tinygemm takes the zero as a bf16 float.
#   gemv     w4a16, 2/4-bit weights, small M: a Triton GEMV on CUDA cores (packed words read once,
#            split-K over >= 4 programs per SM).
#   triton   the fused Triton GEMM of qat.runtime.triton_ops (int codes unpacked in the main loop; for a8
#            int8 tensor-core dots with scales, zero points and bias in the epilogue)
#   dequant  a16: the Triton dequantization kernel writes the weight once in x.dtype, then cuBLAS
#            (F.linear). a8: the activation is quantized (fused kernel) and dequantized to x.dtype, the
#            weight likewise, then cuBLAS: the fake-quant model's own computation, bit for bit in its
#            inputs, for shapes where a bf16 GEMM beats the integer kernel.
#   int_mm   w8a8 per-channel only: torch._int_mm (cuBLAS int8, M > 16, K and N multiples of 8) with
#            the scales applied by torch ops afterwards.
# Where the chosen implementation does not take the shape or dtype, its registry falls back
# (tinygemm -> dequant, gemv -> triton, triton -> dequant, int_mm -> triton; on CPU dequant is the reference).
#
# Measured (bench/int_kernels.py, 2026-11-23, H100 80GB HBM3, torch 2.11+cu130, triton 3.6.0; speedup =
# bf16 F.linear time / implementation time; docs/gpu_runs/kernels-h100-2026-11-23.json):
#   w4a16 g128: the old Triton GEMM 0.09-0.15x at M = 1/16 (4096x11008, M = 1: 531 us vs 48 us);
#               dequant 0.45-0.58x at small M, 0.87-0.92x at M = 4096.
#               tinygemm, timed separately on the same H100 (not by bench/int_kernels.py): 2.1-2.4x at
#               M = 1 (32 us vs 57 us, 1x4096 . 4096x11008), 0.56x at M = 32, 0.04x from M = 512.
#   w8a16 per channel: Triton 1.14x / 1.32x (4096x4096 / 4096x11008) at M = 1, 1.08x / 1.34x at M = 16,
#               0.30-0.39x at M >= 256, where dequant is 0.44-0.56x.
# Hence tinygemm for w4a16 up to M = 16 and dequant above (bf16 F.linear itself stays faster there);
# Triton for w8a16 up to M = 16, dequant above.
# NOT measured: every W*A8 path (its kernel did not compile under triton 3.6 in that run; fixed since),
# the GEMV kernel, the rewritten 4-bit unpacking of the Triton GEMMs and dequantization kernel, and the
# tinygemm integration itself (its self-check and pack cache). Re-run `python -m bench.int_kernels` on an
# H100 and set the thresholds from its table.
_INF = 1 << 62
DISPATCH: dict[str, tuple[tuple[int, str], ...]] = {
    "w4a16": ((16, "tinygemm"), (_INF, "dequant")),
    "w8a16": ((16, "triton"), (_INF, "dequant")),
    "w8a8": ((_INF, "triton"),),
    "w4a8": ((_INF, "triton"),),
}
IMPLS: dict[str, tuple[str, ...]] = {
    "w4a16": ("tinygemm", "gemv", "triton", "dequant", "reference"),
    "w8a16": ("triton", "dequant", "reference"),
    "w8a8": ("triton", "int_mm", "dequant", "reference"),
    "w4a8": ("triton", "dequant", "reference"),
}


def kernels_enabled() -> bool:
    """False when DISTQAT_INT_KERNELS=0 (or false/off/no): every op then runs the torch reference."""
    return os.environ.get(KERNELS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def path_name(bits: int, a8: bool) -> str:
    """The DISPATCH key: 8-bit weights have their own kernels, every packed width runs the w4 ones."""
    return f"w{8 if bits == 8 else 4}a{8 if a8 else 16}"


def choose_impl(path: str, m: int) -> str:
    """The DISPATCH entry for this path at M tokens (before checking that the kernel supports the shape)."""
    for max_m, impl in DISPATCH[path]:
        if m <= max_m:
            return impl
    return DISPATCH[path][-1][1]


# ---------------------------------------------------------------------------------------------
# The device predicate, and the kernel registries of the four ops.


def _use_triton(t: torch.Tensor) -> bool:
    return kernels_enabled() and device_path(t, "int_linear")


def _fallback(x: torch.Tensor) -> str:
    """Where a kernel does not take a layer: dequantize-then-GEMM on the device path; on CPU the exact
    reference, which is as fast."""
    return "dequant" if device_path(x, "int_linear") else "reference"


def _triton_ops():
    """qat.runtime.triton_ops, imported on first use of a kernel."""
    # lazy: triton.jit reads TRITON_INTERPRET when the kernels are defined, and triton is optional on CPU
    from . import triton_ops

    return triton_ops


class IntCall(NamedTuple):
    """What the registries' predicates read about one call: `t` is the tensor the device predicate asks about
    (the activation; the weight when dequantizing), m/n/k the GEMM's sizes, dtype the output's."""

    t: torch.Tensor
    bits: int = 8
    group_size: int = 0
    k: int = 0
    n: int = 0
    m: int = 0
    dtype: Optional[torch.dtype] = None


class Weight(NamedTuple):
    """One converted weight in the layout above, as the linears' kernels take it."""

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    bits: int
    group_size: int
    in_features: int


def _linear_default(c: IntCall, a8: bool) -> str:
    """The DISPATCH choice on the device path (the kill switch and CPU tensors take the reference)."""
    return choose_impl(path_name(c.bits, a8), c.m) if _use_triton(c.t) else "reference"


def _fallback_of(c: IntCall) -> str:
    return _fallback(c.t)


def _to_triton(c: IntCall) -> str:
    return "triton"


def _to_reference(c: IntCall) -> str:
    return "reference"


def _int_mm_runs(c: IntCall) -> bool:
    """torch._int_mm's size rules (M > 16, K and N multiples of 8), per-channel int8 weights, on its device."""
    return (c.bits == 8 and c.group_size == c.k and c.m > 16 and c.k % 8 == 0 and c.n % 8 == 0
            and device_path(c.t, "int_mm"))


def _tinygemm_runs(c: IntCall) -> bool:
    return tinygemm_supported(c.bits, c.group_size, c.k, c.n, c.t)


def _gemv_runs(c: IntCall) -> bool:
    return _triton_ops().gemv_supported(c.bits, c.group_size, c.t.dtype)


def _triton_a16_runs(c: IntCall) -> bool:
    return _triton_ops().a16_supported(c.bits, c.group_size, c.t.dtype)


def _triton_a8_runs(c: IntCall) -> bool:
    return _triton_ops().a8_supported(c.bits, c.group_size, c.k)


def _dequant_kernel_runs(c: IntCall) -> bool:
    return _use_triton(c.t) and _triton_ops().dequant_supported(c.bits, c.dtype)


def _act_kernel_runs(c: IntCall) -> bool:
    return bool(c.m) and _use_triton(c.t) and _triton_ops().act_quant_supported(c.k)


# W*A16: (x2 (M, K), weight, bias, x) -> (M, N) in x.dtype.


def _a16_tinygemm(x2: torch.Tensor, w: Weight, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    y = linear_tinygemm(x2, w.qweight, w.scale, w.zero, w.group_size, w.in_features, bias)
    if y is not None:
        return y
    # not usable for this layer (see tinygemm.prepared)
    return LINEAR_A16.run(_fallback(x), x2, w, bias, x)


def _a16_gemv(x2: torch.Tensor, w: Weight, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return _triton_ops().linear_gemv(x2, w.qweight, w.scale, w.zero, w.bits, w.group_size, bias)


def _a16_triton(x2: torch.Tensor, w: Weight, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return _triton_ops().linear_a16(x2, w.qweight, w.scale, w.zero, w.bits, w.group_size, bias)


def _a16_dequant(x2: torch.Tensor, w: Weight, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return F.linear(x2, dequantize(w, x.dtype), None if bias is None else bias.to(x.dtype))


def _a16_reference(x2: torch.Tensor, w: Weight, bias: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    wt = dequantize_reference(w.qweight, w.scale, w.zero, w.bits, w.group_size, w.in_features, x.dtype)
    return F.linear(x2, wt, None if bias is None else bias.to(x.dtype))


LINEAR_A16: KernelRegistry[IntCall] = KernelRegistry("linear_a16", lambda c: _linear_default(c, False))
LINEAR_A16.add("tinygemm", _a16_tinygemm, _tinygemm_runs, _fallback_of)
LINEAR_A16.add("gemv", _a16_gemv, _gemv_runs, _to_triton)
LINEAR_A16.add("triton", _a16_triton, _triton_a16_runs, _fallback_of)  # the dequantize-then-GEMM path runs any width
LINEAR_A16.add("dequant", _a16_dequant)
LINEAR_A16.add("reference", _a16_reference)
LINEAR_A16.add("int_mm", None, fallback=_to_triton)  # an a8 kernel: asked of an a16 layer, the Triton GEMM runs


# W*A8: (the activation's int8 codes xq, scales xs, zeros xz, weight, bias, out dtype) -> (M, N) in that dtype.


def _a8_triton(xq, xs, xz, w: Weight, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return _triton_ops().linear_a8(xq, xs, xz, w.qweight, w.scale, w.zero, w.bits, w.group_size, bias, dtype)


def _a8_int_mm(xq, xs, xz, w: Weight, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return _linear_a8_int_mm(xq, xs, xz, w.qweight, w.scale, w.zero, bias, dtype)


def _a8_dequant(xq, xs, xz, w: Weight, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    # The fake-quant model's computation: quantized activation and weight, both in x.dtype, cuBLAS.
    xi = xq.float() if xz is None else xq.float() - xz.float()
    xf = (xi * xs).to(dtype)
    return F.linear(xf, dequantize(w, dtype), None if bias is None else bias.to(dtype))


def _a8_reference(xq, xs, xz, w: Weight, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    acc = group_accumulate_reference(xq, xz, w.qweight, w.zero, w.bits, w.group_size, w.in_features)
    return a8_epilogue_reference(acc, xs, w.scale, bias, dtype)


LINEAR_A8: KernelRegistry[IntCall] = KernelRegistry("linear_a8", lambda c: _linear_default(c, True))
LINEAR_A8.add("triton", _a8_triton, _triton_a8_runs, _fallback_of)
LINEAR_A8.add("int_mm", _a8_int_mm, _int_mm_runs, _to_triton)
LINEAR_A8.add("dequant", _a8_dequant)
LINEAR_A8.add("reference", _a8_reference)
# a16 kernels asked of an a8 layer: tinygemm falls back as for a layer it does not take, the GEMV to the GEMM
LINEAR_A8.add("tinygemm", None, fallback=_fallback_of)
LINEAR_A8.add("gemv", None, fallback=_to_triton)

# Dequantization and per-token int8 activation codes: the Triton kernel where it runs, else the reference.
DEQUANTIZE: KernelRegistry[IntCall] = KernelRegistry("dequantize_weight", _to_triton)
DEQUANTIZE.add("triton", lambda *a: _triton_ops().dequantize(*a), _dequant_kernel_runs, _to_reference)
DEQUANTIZE.add("reference", dequantize_reference)
QUANTIZE_ACT: KernelRegistry[IntCall] = KernelRegistry("quantize_act_int8", _to_triton)
QUANTIZE_ACT.add("triton", lambda *a: _triton_ops().quantize_act_int8(*a), _act_kernel_runs, _to_reference)
QUANTIZE_ACT.add("reference", quantize_act_reference)




def dequantize(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in `dtype` by the DEQUANTIZE registry's kernel (the caller checked the layout)."""
    impl = DEQUANTIZE.resolve(None, IntCall(w.qweight, w.bits, dtype=dtype))
    return DEQUANTIZE.run(impl, w.qweight, w.scale, w.zero, w.bits, w.group_size, w.in_features, dtype)


def _linear_a8_int_mm(xq, xs, xz, qweight, scale, zero, bias, dtype) -> torch.Tensor:
    """Per-channel int8 weights: cuBLAS int8 GEMM, then the zero-point corrections as exact int32 ops."""
    acc = torch._int_mm(xq, qweight.t())  # (M, N) int32
    if xz is not None:
        acc = acc - xz * qweight.sum(1, dtype=torch.int32)
    if zero is not None:
        z = zero.to(torch.int32).reshape(1, -1)
        acc = acc - xq.sum(1, keepdim=True, dtype=torch.int32) * z
        if xz is not None:
            acc = acc + xq.shape[1] * xz * z
    y = acc.float() * scale.float().reshape(1, -1) * xs
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


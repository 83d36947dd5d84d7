"""Integer runtime ops of a converted checkpoint: dequantization, W*A16 and W*A8 linears.

Layout of one converted weight (out N, in K, group size g, G = K // g groups; g == K is per channel):

- bits != 8: `qweight` int32 (N, ceil(K * bits / 32)), the unsigned codes u in [0, 2**bits) packed by
  `qat.runtime.pack.pack_int32`; `zero` None (symmetric: z = 2**(bits-1)) or unsigned zeros (N, G).
- bits == 8: `qweight` int8 (N, K), the signed codes q = u - 128; `zero` None (z = 0) or the signed
  zeros z_u - 128 (N, G).
- `scale` (N, G) in bf16/fp16/fp32, exact in its dtype; the weight is (code - zero) * scale.

Every path computes (code - zero) as an exact integer and multiplies by the scale in fp32, which is
what `qat.quantizers.fake_quant_values` does (round(w/s) * s in fp32), so a dequantized weight is the
trained fake-quant weight bit for bit. The 8-bit activation path quantizes each token exactly as the
fake-quant activation quantizer would, then accumulates integer products exactly (int32 on the GPU,
float64 on the CPU, where every partial sum is an integer below 2**53) and applies the scales in fp32.

On CPU tensors the torch reference of `qat.runtime.reference` runs. On CUDA the Triton kernels of
`qat.runtime.triton_ops`, torch's int4 tinygemm kernel or a dequantize-then-cuBLAS path run, chosen per
path and number of tokens M from `DISPATCH`; DISTQAT_INT_KERNELS=0 forces the reference.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..device import device_path
from .pack import packed_cols
from .reference import (
    a8_epilogue_reference,
    dequantize_reference,
    group_accumulate_reference,
    quantize_act_reference,
)
from .tinygemm import linear_tinygemm, tinygemm_supported

__all__ = [
    "dequantize_weight", "linear_a16", "linear_a8", "quantize_act_int8", "choose_impl", "resolve_impl", "path_name",
    "kernels_enabled", "DISPATCH", "IMPLS", "tinygemm_supported",
]

KERNELS_ENV = "DISTQAT_INT_KERNELS"
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

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
# Where the chosen implementation does not take the shape or dtype, `resolve_impl` falls back
# (tinygemm -> dequant, gemv -> triton, triton -> dequant).
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
# Layout checks.


def _check_layout(qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int,
                  group_size: int, in_features: int) -> tuple[int, int, int]:
    """(N, K, G), or a ValueError naming the mismatch: a wrong layout would give silently wrong numbers."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: integer weights have 2..8 bits")
    k = int(in_features)
    if group_size <= 0 or k % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={k}")
    n, g = qweight.shape[0], k // group_size
    if bits == 8:
        if qweight.dtype != torch.int8 or tuple(qweight.shape) != (n, k):
            raise ValueError(f"8-bit qweight must be int8 ({n}, {k}), got {qweight.dtype} {tuple(qweight.shape)}")
    elif qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[1] != packed_cols(k, bits):
        raise ValueError(f"{bits}-bit qweight must be int32 ({n}, {packed_cols(k, bits)}), got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    if tuple(scale.shape) != (n, g) or scale.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"scale must be ({n}, {g}) bf16/fp16/fp32, got {scale.dtype} {tuple(scale.shape)}")
    if zero is not None and (tuple(zero.shape) != (n, g) or zero.dtype.is_floating_point):
        raise ValueError(f"zero must be an integer tensor ({n}, {g}), got {zero.dtype} {tuple(zero.shape)}")
    return n, k, g


# ---------------------------------------------------------------------------------------------
# Dequantization and the 16-bit-activation linear.


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


def resolve_impl(
    impl: Optional[str], bits: int, a8: bool, m: int, n: int, k: int, group_size: int, x: torch.Tensor
) -> str:
    """The implementation that runs: `impl` (None: the DISPATCH choice), or its fallback where the kernel
    does not take the shape (bits 3/5/6/7, odd group sizes, int_mm's size rules)."""
    if impl is None:
        if not _use_triton(x):
            return "reference"
        impl = choose_impl(path_name(bits, a8), m)
    if impl == "int_mm" and not (a8 and bits == 8 and group_size == k and m > 16 and k % 8 == 0 and n % 8 == 0
                                 and device_path(x, "int_mm")):
        impl = "triton"
    if impl == "tinygemm" and not (not a8 and tinygemm_supported(bits, group_size, k, n, x)):
        impl = _fallback(x)
    if impl == "gemv" and (a8 or not _triton_ops().gemv_supported(bits, group_size, x.dtype)):
        impl = "triton"
    if impl == "triton":
        triton_ops = _triton_ops()
        ok = triton_ops.a8_supported(bits, group_size, k) if a8 else triton_ops.a16_supported(bits, group_size, x.dtype)
        if not ok:
            impl = _fallback(x)  # the dequantize-then-GEMM path runs any width
    if impl not in IMPLS[path_name(bits, a8)]:
        raise ValueError(f"unknown impl {impl!r} for {path_name(bits, a8)}; one of {IMPLS[path_name(bits, a8)]}")
    return impl


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int, group_size: int,
    in_features: int, dtype: torch.dtype,
) -> torch.Tensor:
    """(N, K) weight in `dtype`, equal bit for bit to the fake-quant weight the model was trained with.

    On CUDA a Triton kernel writes it in one pass (bits 2, 4, 8), which is what makes the dequantize-then-
    cuBLAS path cheap at large M; elsewhere the torch reference runs.
    """
    _check_layout(qweight, scale, zero, bits, group_size, in_features)
    if _use_triton(qweight) and _triton_ops().dequant_supported(bits, dtype):
        return _triton_ops().dequantize(qweight, scale, zero, bits, group_size, in_features, dtype)
    return dequantize_reference(qweight, scale, zero, bits, group_size, in_features, dtype)


def _flat(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer takes {in_features}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"input dtype {x.dtype}: integer linears take bf16, fp16 or fp32 activations")
    return x.reshape(-1, in_features)


def linear_a16(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int,
    group_size: int, in_features: int, bias: Optional[torch.Tensor] = None, impl: Optional[str] = None,
) -> torch.Tensor:
    """y = x @ W^T + bias with W dequantized to x.dtype; (..., K) -> (..., N) in x.dtype.

    `impl` overrides the dispatcher ("triton", "dequant", "reference"; benchmarks and tests use it).
    """
    n, k, _ = _check_layout(qweight, scale, zero, bits, group_size, in_features)
    x2 = _flat(x, k)
    out_shape = (*x.shape[:-1], n)
    impl = resolve_impl(impl, bits, False, x2.shape[0], n, k, group_size, x)
    if impl == "tinygemm":
        y = linear_tinygemm(x2, qweight, scale, zero, group_size, k, bias)
        if y is not None:
            return y.reshape(out_shape)
        impl = _fallback(x)  # not usable for this layer (see tinygemm.prepared)
    if impl == "gemv":
        return _triton_ops().linear_gemv(x2, qweight, scale, zero, bits, group_size, bias).reshape(out_shape)
    if impl == "triton":
        return _triton_ops().linear_a16(x2, qweight, scale, zero, bits, group_size, bias).reshape(out_shape)
    if impl == "dequant":
        w = dequantize_weight(qweight, scale, zero, bits, group_size, k, x.dtype)
    else:
        w = dequantize_reference(qweight, scale, zero, bits, group_size, k, x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x2, w, b).reshape(out_shape)


# ---------------------------------------------------------------------------------------------
# 8-bit activations.


def quantize_act_int8(
    x2d: torch.Tensor, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Dynamic per-token int8 codes of a (M, K) activation: (xq int8, xscale fp32 (M, 1), xzero int32 (M, 1)).

    (xq - xzero) * xscale, cast to x.dtype, is the fake-quant activation of the trained model bit for bit
    (min/max scale of each row, no scale rounding, clamp then round). Asymmetric codes c in [0, 255] are
    stored shifted to int8 (c - 128, zero z - 128), so both cases feed one signed int8 GEMM; xzero is
    None when symmetric.
    """
    if x2d.dim() != 2 or x2d.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_act_int8 takes a 2-D bf16/fp16/fp32 tensor, got {x2d.dtype} {tuple(x2d.shape)}")
    if x2d.shape[0] and _use_triton(x2d) and _triton_ops().act_quant_supported(x2d.shape[1]):
        return _triton_ops().quantize_act_int8(x2d, bool(symmetric))
    return quantize_act_reference(x2d, bool(symmetric))


def linear_a8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int,
    group_size: int, in_features: int, act_symmetric: bool, bias: Optional[torch.Tensor] = None,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """y = x @ W^T + bias with x quantized per token to int8 and an exact integer GEMM per weight group.

    (..., K) -> (..., N) in x.dtype. `impl` overrides the dispatcher ("triton", "int_mm", "dequant",
    "reference").
    """
    n, k, ng = _check_layout(qweight, scale, zero, bits, group_size, in_features)
    x2 = _flat(x, k)
    out_shape = (*x.shape[:-1], n)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(out_shape)
    impl = resolve_impl(impl, bits, True, m, n, k, group_size, x)
    if impl == "triton":
        xq, xs, xz = quantize_act_int8(x2, act_symmetric)
        return _triton_ops().linear_a8(xq, xs, xz, qweight, scale, zero, bits, group_size, bias,
                                       x.dtype).reshape(out_shape)
    if impl == "int_mm":
        xq, xs, xz = quantize_act_int8(x2, act_symmetric)
        return _linear_a8_int_mm(xq, xs, xz, qweight, scale, zero, bias, x.dtype).reshape(out_shape)
    if impl == "dequant":
        # The fake-quant model's computation: quantized activation and weight, both in x.dtype, cuBLAS.
        xq, xs, xz = quantize_act_int8(x2, act_symmetric)
        xi = xq.float() if xz is None else xq.float() - xz.float()
        xf = (xi * xs).to(x.dtype)
        w = dequantize_weight(qweight, scale, zero, bits, group_size, k, x.dtype)
        return F.linear(xf, w, None if bias is None else bias.to(x.dtype)).reshape(out_shape)
    xq, xs, xz = quantize_act_int8(x2, act_symmetric)
    acc = group_accumulate_reference(xq, xz, qweight, zero, bits, group_size, k)
    return a8_epilogue_reference(acc, xs, scale, bias, x.dtype).reshape(out_shape)


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


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
path and number of tokens M from `DISPATCH`; DISTQAT_INT_KERNELS=0 forces the reference. Each op picks its kernel
from its registry in `qat.runtime.int_kernels` (`LINEAR_A16`, `LINEAR_A8`, `DEQUANTIZE`, `QUANTIZE_ACT`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .int_kernels import (
    DISPATCH,
    IMPLS,
    KERNELS_ENV,
    LINEAR_A8,
    LINEAR_A16,
    QUANTIZE_ACT,
    IntCall,
    Weight,
    choose_impl,
    dequantize,
    kernels_enabled,
    path_name,
    tinygemm_supported,
)
from .pack import packed_cols

__all__ = [
    "dequantize_weight", "linear_a16", "linear_a8", "quantize_act_int8", "choose_impl", "resolve_impl", "path_name",
    "kernels_enabled", "DISPATCH", "IMPLS", "KERNELS_ENV", "tinygemm_supported",
]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


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
# The ops.


def resolve_impl(
    impl: Optional[str], bits: int, a8: bool, m: int, n: int, k: int, group_size: int, x: torch.Tensor
) -> str:
    """The implementation that runs: `impl` (None: the DISPATCH choice), or its fallback where the kernel
    does not take the shape (bits 3/5/6/7, odd group sizes, int_mm's size rules)."""
    registry = LINEAR_A8 if a8 else LINEAR_A16
    impl = registry.resolve(impl, IntCall(x, bits, group_size, k, n, m))
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
    return dequantize(Weight(qweight, scale, zero, bits, group_size, in_features), dtype)


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

    `impl` overrides the dispatcher (a name of `LINEAR_A16`; benchmarks and tests use it).
    """
    n, k, _ = _check_layout(qweight, scale, zero, bits, group_size, in_features)
    x2 = _flat(x, k)
    impl = resolve_impl(impl, bits, False, x2.shape[0], n, k, group_size, x)
    w = Weight(qweight, scale, zero, bits, group_size, k)
    return LINEAR_A16.run(impl, x2, w, bias, x).reshape(*x.shape[:-1], n)


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
    impl = QUANTIZE_ACT.resolve(None, IntCall(x2d, k=x2d.shape[1], m=x2d.shape[0]))
    return QUANTIZE_ACT.run(impl, x2d, bool(symmetric))


def linear_a8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], bits: int,
    group_size: int, in_features: int, act_symmetric: bool, bias: Optional[torch.Tensor] = None,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """y = x @ W^T + bias with x quantized per token to int8 and an exact integer GEMM per weight group.

    (..., K) -> (..., N) in x.dtype. `impl` overrides the dispatcher (a name of `LINEAR_A8`).
    """
    n, k, ng = _check_layout(qweight, scale, zero, bits, group_size, in_features)
    x2 = _flat(x, k)
    out_shape = (*x.shape[:-1], n)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(out_shape)
    impl = resolve_impl(impl, bits, True, m, n, k, group_size, x)
    xq, xs, xz = quantize_act_int8(x2, act_symmetric)
    w = Weight(qweight, scale, zero, bits, group_size, k)
    return LINEAR_A8.run(impl, xq, xs, xz, w, bias, x.dtype).reshape(out_shape)

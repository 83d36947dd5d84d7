"""4-bit weights through torch's tinygemm kernel (aten._weight_int4pack_mm), one W4A16 path of ops.

The op wants its own packed layout and a (G, N, 2) [scale, zero] table; both are built once per layer
on first use, cached on the `qweight` tensor, and self-checked against the exact dequantized weight,
because the CUDA packing convention cannot be tested without a GPU. A failed check disables the path
for the process (ops then dequantizes instead).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..device import device_path, on_cuda
from .pack import unpack_int32
from .reference import dequantize_reference

TINYGEMM_GROUPS = (32, 64, 128, 256)
TINYGEMM_PROBE_RTOL = 1e-2
_TINYGEMM_ATTR = "_distqat_tinygemm"
_tinygemm_state = {"disabled": None}  # a reason once the self-check failed or the op is missing


def _tinygemm_inner_k_tiles(k: int) -> int:
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), 0)


def tinygemm_supported(bits: int, group_size: int, k: int, n: int, x: torch.Tensor) -> bool:
    """Shapes and dtypes tinygemm takes (the scale dtype is checked when the pack is built): 4-bit codes,
    bf16 activations, groups of 32..256, K a multiple of 32, N of 16; CUDA (not ROCm) or the CPU variant."""
    if _tinygemm_state["disabled"] is not None or bits != 4 or group_size not in TINYGEMM_GROUPS:
        return False
    if x.dtype != torch.bfloat16 or not _tinygemm_inner_k_tiles(k) or k % group_size or n % 16:
        return False
    if device_path(x, "tinygemm_cuda"):
        return torch.version.hip is None and hasattr(torch.ops.aten, "_weight_int4pack_mm")
    return x.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def tinygemm_scales_and_zeros(scale: torch.Tensor, zero: Optional[torch.Tensor]) -> torch.Tensor:
    """(G, N, 2) bf16 [scale, zero] for tinygemm, whose weight is (u - 8) * scale + zero for unsigned
    4-bit codes u; ours is (u - z) * scale, so zero = (8 - z) * scale (0 when symmetric: z = 8).
    The zero is rounded to bf16 here: asymmetric weights differ from the fake-quant ones by up to half a
    bf16 ulp of (8 - z) * scale."""
    s = scale.float()
    zf = torch.zeros_like(s) if zero is None else (8 - zero.to(torch.float32)) * s
    return torch.stack([s.t(), zf.t()], dim=-1).to(torch.bfloat16).contiguous()


def _tinygemm_pack(u: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """Unsigned codes (N, K) -> the op's packed weight. CUDA takes two codes per byte, the first in the
    high nibble (torch >= 2.5, as gpt-fast / torchao pack them); the CPU op takes int32 codes."""
    if on_cuda(u):
        w8 = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(w8.contiguous(), inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), inner_k_tiles)


def _tinygemm_mm(x2d: torch.Tensor, packed: torch.Tensor, group_size: int, sz: torch.Tensor) -> torch.Tensor:
    if on_cuda(x2d):
        return torch.ops.aten._weight_int4pack_mm(x2d, packed, group_size, sz)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, packed, group_size, sz)


def _disable_tinygemm(reason: str) -> None:
    if _tinygemm_state["disabled"] is None:
        _tinygemm_state["disabled"] = reason
        warnings.warn(f"distqat: tinygemm (aten._weight_int4pack_mm) disabled for this process, {reason}; "
                      "4-bit linears fall back to the dequantize-then-GEMM path", RuntimeWarning, stacklevel=3)


def prepared(
    qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], group_size: int, in_features: int
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(packed, scales_and_zeros) cached on `qweight`, built and self-checked on first use; None when
    tinygemm must not run (self-check failed, op error, non-bf16 scales, or inside CUDA-graph capture
    with nothing cached yet)."""
    versions = (qweight._version, scale._version, None if zero is None else zero._version,
                scale.data_ptr(), None if zero is None else zero.data_ptr())
    cached = getattr(qweight, _TINYGEMM_ATTR, None)
    if cached is not None and cached[0] == versions:
        return cached[1]
    if scale.dtype != torch.bfloat16:
        return None  # rounding other scales to bf16 would change the weights
    if on_cuda(qweight) and torch.cuda.is_current_stream_capturing():
        return None  # conversion and the self-check synchronise: not inside a graph capture
    k = in_features
    try:
        u = unpack_int32(qweight, 4, k).to(torch.int32)
        packed = _tinygemm_pack(u, _tinygemm_inner_k_tiles(k))
        sz = tinygemm_scales_and_zeros(scale, zero)
        # Self-check on a probe input against the exact dequantized weight (catches a packing
        # convention that differs in this torch build).
        gen = torch.Generator(device=qweight.device).manual_seed(0)
        probe = torch.randn(2, k, generator=gen, device=qweight.device).to(torch.bfloat16)
        w = dequantize_reference(qweight, scale, zero, 4, group_size, k, torch.float32)
        ref = probe.float() @ w.t()
        got = _tinygemm_mm(probe, packed, group_size, sz).float()
        err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        _disable_tinygemm(f"the op raised {type(e).__name__}: {str(e)[:200]}")
        return None
    if not err < TINYGEMM_PROBE_RTOL:  # also catches nan
        _disable_tinygemm(f"its output differs from the dequantized reference (max rel. error {err:.3g} "
                          f">= {TINYGEMM_PROBE_RTOL}) on a {tuple(qweight.shape)} weight")
        return None
    setattr(qweight, _TINYGEMM_ATTR, (versions, (packed, sz)))
    return packed, sz


def linear_tinygemm(
    x2d: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor], group_size: int,
    in_features: int, bias: Optional[torch.Tensor],
) -> Optional[torch.Tensor]:
    """(M, K) bf16 -> (M, N) bf16 through tinygemm, or None when it must not run (the caller falls back)."""
    if x2d.shape[0] == 0:
        return x2d.new_empty(0, qweight.shape[0])
    prepared_ = prepared(qweight, scale, zero, group_size, in_features)
    if prepared_ is None:
        return None
    packed, sz = prepared_
    y = _tinygemm_mm(x2d.contiguous(), packed, group_size, sz)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y

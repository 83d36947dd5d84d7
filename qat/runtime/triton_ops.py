"""Triton kernels of the integer runtime, the one module `qat.runtime.ops` calls them through:
dequantization, W4/W8 x A16 GEMM, W2/W4 x A16 GEMV (`qat.runtime.triton_a16`), int8 activation quant and
W8/W4 x A8 GEMM (`qat.runtime.triton_a8`). Their shared helpers and conventions are in
`qat.runtime.triton_common`; split-K sizing reads `triton_common._num_sms`.

Import this module only after deciding on interpret mode: `triton.jit` reads TRITON_INTERPRET when
the kernels are defined.
"""

from __future__ import annotations

from .triton_a8 import (
    ACT_MAX_K,
    MAX_GROUP_A8,
    a8_supported,
    act_quant_supported,
    linear_a8,
    quantize_act_int8,
)
from .triton_a16 import (
    GEMV_BITS,
    GEMV_WORDS,
    a16_supported,
    dequant_supported,
    dequantize,
    gemv_config,
    gemv_split,
    gemv_supported,
    linear_a16,
    linear_gemv,
)
from .triton_common import KERNEL_BITS, gemm_config, split_k

__all__ = [
    "ACT_MAX_K", "GEMV_BITS", "GEMV_WORDS", "KERNEL_BITS", "MAX_GROUP_A8", "a8_supported", "a16_supported",
    "act_quant_supported", "dequant_supported", "dequantize", "gemm_config", "gemv_config", "gemv_split",
    "gemv_supported", "linear_a8", "linear_a16", "linear_gemv", "quantize_act_int8", "split_k",
]

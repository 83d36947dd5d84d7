"""Where a dispatcher's device branch runs: the one place in qat/ that asks what device a tensor is on.

An op with a device kernel has two branches, the kernel and a torch reference (the oracle its tests compare
against). Every dispatcher picks between them with `device_path(t, op)`:

- The Triton kernels (`TRITON_OPS`) run on CUDA tensors, and on CPU tensors under the Triton interpreter
  (TRITON_INTERPRET=1 before triton is first imported). That is how the test suite's device lane
  (`./launch.sh test`, its second run) executes the branch a GPU takes on a machine without one.
- The CUDA ops of torch that no interpreter runs (`CUDA_ONLY`) take their branch on CUDA tensors only; their
  tests against the reference are GPU-only (`@pytest.mark.cuda`).

`on_cuda(t)` answers the hardware question inside a launcher (the device index, the GPU's reciprocal, which of
an op's CUDA and CPU variants to call) and is not for dispatch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Optional

import torch

# op -> what runs on the device path (and where its kernel lives).
TRITON_OPS: dict[str, str] = {
    "fake_quant": "qat/kernels/fake_quant.py: per-row min/max int fake quant (weights, activations, KV cache); "
                  "qat/kernels/fp4_quant.py: NVFP4 / MXFP4 block fake quant",
    "norm_quant": "qat/kernels/norm_quant.py: RMSNorm + per-token fake quant (train.speedups=[norm_quant])",
    "int_linear": "qat/runtime/triton_*.py: weight dequantization, the W*A16 / W*A8 GEMMs and GEMV, int8 "
                  "activation codes (the integer runtime and the QLoRA packed base); the dispatcher's tinygemm "
                  "choice runs aten's CPU variant of tinygemm on CPU tensors",
}
# op -> why the interpreter cannot stand in for it. These branches run only on a GPU: bench/gpu_suite.sh's
# cuda_tests part (pytest -m cuda) compares each with its reference there.
CUDA_ONLY: dict[str, str] = {
    "tinygemm_cuda": "torch.ops.aten._weight_int4pack_mm: tinygemm's CUDA kernel and its nibble packing (on CPU "
                     "the dispatcher's tinygemm branch runs _weight_int4pack_mm_for_cpu, which packs int32 codes)",
    "int_mm": "torch._int_mm: cuBLAS's int8 GEMM (w8a8 per channel, impl='int_mm'; LLM.int8()'s int8 part)",
    "scaled_mm": "torch._scaled_mm: the fp8 GEMM of compute capability 8.9+ (qat.runtime.fp8.Fp8Linear)",
}

_HAVE_TRITON: Optional[bool] = None


def interpret_mode() -> bool:
    """True when Triton kernels run in the interpreter (TRITON_INTERPRET=1), which accepts CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    global _HAVE_TRITON
    if _HAVE_TRITON is None:
        _HAVE_TRITON = importlib.util.find_spec("triton") is not None
    return _HAVE_TRITON


def on_cuda(t: torch.Tensor) -> bool:
    """Whether `t` lives on a CUDA device: for launchers' hardware facts, not for choosing a branch."""
    return t.is_cuda


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The device context a kernel launch on `t` needs: Triton launches on the current CUDA device."""
    if on_cuda(t) and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def device_path(t: torch.Tensor, op: str) -> bool:
    """Whether the device branch of `op` runs for a tensor like `t` (before the op's own shape and dtype rules).

    Triton ops: on CUDA, or on any device in interpret mode, with triton installed. CUDA-only ops: on CUDA.
    """
    if op in TRITON_OPS:
        return (on_cuda(t) or interpret_mode()) and triton_available()
    if op in CUDA_ONLY:
        return on_cuda(t)
    raise KeyError(f"unknown device op {op!r}: declare it in qat/device.py (TRITON_OPS or CUDA_ONLY)")


__all__ = ["CUDA_ONLY", "TRITON_OPS", "device_path", "interpret_mode", "launch_device", "on_cuda", "triton_available"]

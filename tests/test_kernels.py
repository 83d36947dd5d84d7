"""The fused fake-quant kernel against the reference numerics of qat.quantizers, bit for bit.

On CPU the kernel runs in the Triton interpreter. TRITON_INTERPRET must be set before triton is
imported, so those checks run in the device lane (`TRITON_INTERPRET=1 pytest -m lane`, the second run of
`./launch.sh test`). The CUDA tests compare the compiled kernel at real sizes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import lane_only, needs_cuda, needs_triton
from helpers.quant_ref import kernel_and_reference, kernel_mismatch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _spec(bits: int, symmetric: bool, grid: str = "full"):
    from qat.spec import TensorSpec

    return TensorSpec(bits=bits, symmetric=symmetric, granularity="channel", sym_range=grid if symmetric else None)


def _sample(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Random rows with an all-zero row, an outlier row, a tiny-valued row and an all-negative row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    R, n = shape
    if R > 1:
        x[1] = 0
    if R > 2:
        x[2, ::7] *= 300  # large outliers
    if R > 3:
        x[3] *= 1e-6
    if R > 4:
        x[4] = -x[4].abs() - 0.5
    if R > 5:
        x[5] = x[5].abs()
    return x.to(dtype).to(device)


def _compare(x: torch.Tensor, bits: int, symmetric: bool, scale_dtype, grid: str = "full") -> str:
    """'' when kernel and reference agree, else a description of the mismatch."""
    from qat.kernels import fused_fake_quant_rows
    from qat.quantizers import fake_quant

    ref = fake_quant(x, _spec(bits, symmetric, grid), scale_dtype, use_kernel=False)
    out = fused_fake_quant_rows(x, bits, symmetric, scale_dtype, grid)
    return kernel_mismatch(out, ref, f"shape={tuple(x.shape)} {x.dtype} bits={bits} sym={symmetric} "
                           f"grid={grid} scale_dtype={scale_dtype}")


# Every grid of the kernel: asymmetric, and the three symmetric ones (signed is the weights' default).
GRIDS = ((False, "full"), (True, "full"), (True, "signed"), (True, "qmax"))


# ---------------------------------------------------------------------------------------------
# Interpreter checks (the device lane: TRITON_INTERPRET=1 before triton is imported).


def _check_matrix() -> list[str]:
    """bits x symmetry x dtype x scale dtype x odd row lengths, several rows each."""
    errors = []
    shapes = [(6, 7), (9, 100), (6, 576)]
    for i, shape in enumerate(shapes):
        for dtype in DTYPES:
            x = _sample(shape, dtype, seed=i)
            for bits in (2, 3, 4, 8):
                for symmetric, grid in GRIDS:
                    for scale_dtype in (None, torch.bfloat16):
                        errors.append(_compare(x, bits, symmetric, scale_dtype, grid))
    return [e for e in errors if e]


def _check_edges() -> list[str]:
    from qat.kernels import fused_fake_quant_rows

    errors = []
    # Many short rows per program (group-wise weights), a row count that leaves a partial block.
    for dtype in DTYPES:
        x = _sample((77, 32), dtype, seed=3)
        for bits, sym in ((4, True), (4, False), (8, True)):
            errors.append(_compare(x, bits, sym, dtype))
    # n = 1, a single row, a single all-zero row.
    errors.append(_compare(_sample((5, 1), torch.bfloat16, seed=4), 4, True, None))
    errors.append(_compare(_sample((5, 1), torch.float32, seed=4), 3, False, None))
    errors.append(_compare(_sample((1, 33), torch.float16, seed=5), 8, False, None))
    errors.append(_compare(torch.zeros(1, 16, dtype=torch.bfloat16), 4, True, torch.bfloat16))
    errors.append(_compare(torch.zeros(2, 16, dtype=torch.bfloat16), 4, False, torch.bfloat16))
    # Non-contiguous input (a transposed view): the kernel copies it to rows first.
    base = _sample((100, 12), torch.bfloat16, seed=6)
    errors.append(_compare(base.t(), 4, True, torch.bfloat16))
    errors.append(_compare(base[:, ::2], 8, False, None))
    # fp16 scales: an all-zero row has a scale of 1e-8, which is 0 in fp16, so the reference gives NaN.
    for sym, grid in GRIDS:
        errors.append(_compare(_sample((6, 100), torch.float16, seed=7), 4, sym, torch.float16, grid))
    # Rows with inf / NaN come out all NaN as in the reference; other rows are unaffected.
    x = _sample((4, 50), torch.float32, seed=8)
    x[0, 3], x[2, 5], x[3, 7] = float("nan"), float("inf"), -float("inf")
    for sym, grid in GRIDS:
        errors.append(_compare(x, 4, sym, None, grid))
        errors.append(_compare(x.bfloat16(), 8, sym, torch.bfloat16, grid))
    # Ties: values on exact half steps of the grid (round half to even).
    x = (torch.arange(-40, 41, dtype=torch.float32) / 2).reshape(1, -1)  # absmax 20 -> scale 20/7 (w4)
    x = torch.cat([x, (torch.arange(-127, 128, dtype=torch.float32)[:81] + 0.5).reshape(1, -1)])
    for bits in (4, 8):
        for sym, grid in GRIDS:
            errors.append(_compare(x, bits, sym, None, grid))
    # Shapes and bits the kernel leaves to the reference.
    if fused_fake_quant_rows(torch.ones(2, 40000), 4, True, None) is not None:
        errors.append("rows longer than 32768 should return None")
    if fused_fake_quant_rows(torch.ones(2, 8), 9, True, None) is not None:
        errors.append("bits=9 should return None")
    if fused_fake_quant_rows(torch.ones(2, 8, 2), 4, True, None) is not None:
        errors.append("3-D input should return None")
    if fused_fake_quant_rows(torch.ones(2, 8, dtype=torch.float64), 4, True, None) is not None:
        errors.append("float64 should return None")
    empty = fused_fake_quant_rows(torch.ones(0, 8), 4, True, None)
    if empty is None or empty.shape != (0, 8):
        errors.append("0 rows should give an empty result")
    return [e for e in errors if e]


def _check_rounding() -> list[str]:
    """The interpreter's fp32 -> bf16/fp16 cast does not round to nearest even; the kernel's emulation does."""
    import triton
    import triton.language as tl

    from qat.kernels.fake_quant import round_to

    globals()["round_to"] = round_to  # a jit function resolves the functions it calls in its globals

    @triton.jit
    def kernel(x_ptr, o_ptr, N, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + c, mask=c < N, other=0.0)
        tl.store(o_ptr + c, round_to(x, DTYPE, True), mask=c < N)

    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 2**32, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    x = patterns.view(torch.float32)
    x = torch.cat([
        x[~torch.isnan(x)], torch.randn(1 << 14, generator=g), torch.rand(1 << 14, generator=g) * 1e-6,
        torch.tensor([0.0, -0.0, 1e-8, 65504.0, 65519.99, 65520.0, 1e6, float("inf"), -float("inf"),
                      1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, 2**-25, 3 * 2**-26]),
    ])
    errors = []
    for code, dtype in ((1, torch.bfloat16), (2, torch.float16)):
        out = torch.empty_like(x)
        kernel[(triton.cdiv(x.numel(), 8192),)](x, out, x.numel(), DTYPE=code, BLOCK=8192)
        ref = x.to(dtype).float()
        if not torch.equal(out.view(torch.int32), ref.view(torch.int32)):
            errors.append(f"{dtype}: {int((out != ref).sum())} of {x.numel()} values round differently")
    return errors


CHECKS = {"matrix": _check_matrix, "edges": _check_edges, "rounding": _check_rounding}


@needs_triton
@lane_only
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_interpreter(check):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy on the NaN/inf rows, in the interpreter
        assert CHECKS[check]() == []


def test_no_kernel_on_cpu_without_interpreter(monkeypatch):
    from qat.kernels import fused_fake_quant_rows
    from qat.quantizers import fake_quant

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert fused_fake_quant_rows(x, 4, True, None) is None
    # fake_quant on CPU never takes the kernel path and keeps the identity gradient.
    x.requires_grad_(True)
    fake_quant(x, _spec(4, True)).float().sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# ---------------------------------------------------------------------------------------------
# CUDA: the compiled kernel at real sizes, and through QuantLinear.

CUDA_CASES = [
    ((8192, 4096), torch.bfloat16, 8, True, None),  # per-token activations (a8)
    ((8192, 4096), torch.bfloat16, 8, False, None),
    ((4096, 4096), torch.bfloat16, 4, True, torch.bfloat16),  # per-channel weights (w4)
    ((4096, 4096), torch.float16, 4, False, torch.float16),
    ((4096 * 4096 // 128, 128), torch.bfloat16, 4, True, torch.bfloat16),  # group-wise (w4g128)
    ((4096 * 4096 // 128, 128), torch.bfloat16, 4, False, torch.bfloat16),
    ((11008 * 4096 // 32, 32), torch.bfloat16, 3, True, torch.bfloat16),
    ((4096 * 4096 // 64, 64), torch.float32, 2, False, None),
    ((2048, 11008), torch.bfloat16, 8, True, None),  # 11008-wide rows (MLP down_proj input)
    ((4096, 11008), torch.bfloat16, 4, True, torch.bfloat16),
    ((4096, 11008), torch.float32, 4, False, None),
    ((8192, 128), torch.bfloat16, 8, True, None),  # kv per head
    ((1000, 7), torch.float16, 8, False, None),
    ((333, 100), torch.bfloat16, 4, True, None),
    ((64, 576), torch.float32, 3, True, torch.bfloat16),
    ((16, 32768), torch.bfloat16, 8, True, None),  # the longest rows the kernel takes
]


@needs_cuda
@pytest.mark.parametrize("shape,dtype,bits,symmetric,scale_dtype", CUDA_CASES)
def test_cuda_matches_reference(shape, dtype, bits, symmetric, scale_dtype):
    x = _sample(shape, dtype, seed=shape[0] + shape[1], device="cuda")
    assert _compare(x, bits, symmetric, scale_dtype) == ""


@needs_cuda
def test_cuda_edges():
    x = _sample((64, 4096), torch.bfloat16, device="cuda")
    x[10, 5], x[20, 6], x[30, 7] = float("nan"), float("inf"), -float("inf")
    for sym in (True, False):
        assert _compare(x, 8, sym, None) == ""
    base = _sample((4096, 512), torch.bfloat16, device="cuda")
    assert _compare(base.t(), 4, True, torch.bfloat16) == ""  # non-contiguous
    assert _compare(_sample((256, 100), torch.float16, device="cuda"), 4, True, torch.float16) == ""
    from qat.kernels import fused_fake_quant_rows

    assert fused_fake_quant_rows(torch.ones(1, 65536, device="cuda"), 8, True, None) is None


# QuantLinear through the kernel on its device path: a GPU at full size; CPU tensors in the lane at a small one.
DEVICE_SIZES = [pytest.param("cuda", (4096, 1024, 4, 512), marks=pytest.mark.cuda, id="gpu"),
                pytest.param("cpu", (256, 96, 2, 24), marks=pytest.mark.lane, id="lane")]


@needs_triton
@pytest.mark.parametrize("device,size", DEVICE_SIZES)
@pytest.mark.parametrize("scheme", ["w4a8", "w4g128a8", "w4asyma8asym", "w8g32a8"])
def test_quant_linear_through_the_kernel_matches_reference(scheme, device, size, kernel_calls, monkeypatch):
    from torch import nn

    from qat.device import device_path
    from qat.linear import QuantLinear
    from qat.spec import parse

    k, n, b, t = size
    spec = parse(scheme)
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=True, device=device, dtype=torch.bfloat16)
    ql = QuantLinear.from_linear(lin, spec.weight, spec.activation)
    x0 = torch.randn(b, t, k, device=device, dtype=torch.bfloat16)
    if not device_path(x0, "fake_quant"):
        pytest.skip("the kernel's device path is off here (CPU outside the lane)")
    x0[0, 3, ::5] *= 50
    grad = torch.randn(b, t, n, device=device, dtype=torch.bfloat16)

    fused, ref = kernel_and_reference(ql, x0, grad, monkeypatch, "fused_fake_quant_rows", kernel_calls, "fake_quant")
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), fused, ref):
        assert torch.equal(a, b), name

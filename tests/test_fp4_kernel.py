"""The fused NVFP4 / MXFP4 fake-quant kernel (qat/kernels/fp4_quant.py) against the reference numerics of
qat.fp4 and qat.quantizers, bit for bit, forward and gradient.

The kernel runs on CPU tensors in the Triton interpreter, so these run in the device lane
(`TRITON_INTERPRET=1 pytest -m lane`, the second run of `./launch.sh test`); small shapes.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import lane_only, needs_cuda, needs_triton
from helpers.quant_ref import kernel_and_reference, kernel_mismatch, same_bits

import qat.quantizers
from qat.kernels import fused_fp4_fake_quant_rows
from qat.quantizers import fake_quant
from qat.spec import FP4_FORMATS, TensorSpec

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _spec(fmt: str) -> TensorSpec:
    return TensorSpec(bits=4, granularity="group", group_size=FP4_FORMATS[fmt], format=fmt)


def _sample(blocks: int, fmt: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random block rows with a zero block, an outlier block, blocks far below the tensor's largest (e4m3
    subnormal and floored NVFP4 block scales), a -0.0 and values on e2m1 ties of their block scale."""
    g = torch.Generator().manual_seed(seed)
    n = FP4_FORMATS[fmt]
    x = torch.randn(blocks, n, generator=g) * torch.exp2(torch.randint(-6, 7, (blocks, 1), generator=g).float())
    x[1] = 0
    x[2, ::5] *= 500
    x[3] *= 2.0**-12  # s = G * amax / 6 lands in e4m3's subnormals
    x[4] *= 2.0**-22  # below e4m3's smallest: the 2^-9 floor
    x[5, 0] = -0.0
    x[6] = torch.arange(n) % 13 * 0.25 + 0.25  # amax 3.25: halves and quarters, ties of e2m1 under most scales
    return x.to(dtype)


def _check(x: torch.Tensor, fmt: str, global_rows) -> str:
    """'' when kernel and reference agree, else what differs."""
    ref = fake_quant(x, _spec(fmt), use_kernel=False, global_rows=global_rows)
    out = fused_fp4_fake_quant_rows(x, fmt, global_rows)
    return kernel_mismatch(out, ref, f"{fmt} {tuple(x.shape)} {x.dtype} global_rows={global_rows}")


@needs_triton
@lane_only
@pytest.mark.parametrize("fmt", sorted(FP4_FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weights_and_per_token_activations_match_reference(fmt, dtype):
    # One tensor scale (weights: global_rows None), per-token scales (4 blocks a token; the tokens' scales
    # differ by up to 2^12, so their k differ), and a single block per chunk.
    x = _sample(48, fmt, dtype)
    errors = [_check(x, fmt, gr) for gr in (None, 4, 1)]
    errors.append(_check(x[:7], fmt, None))  # a block count that leaves most of the program's tile empty
    assert [e for e in errors if e] == []


@needs_triton
@lane_only
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_nvfp4_weight_over_one_program_takes_its_tensor_scale_from_torch(dtype):
    from qat.kernels.fp4_quant import MAX_CHUNK

    blocks = MAX_CHUNK // 16 + 200  # one tensor scale over more blocks than one program holds
    x = _sample(blocks, "nvfp4", dtype, seed=1)
    x[-1, 3] = 3000.0  # the tensor's largest block sits in the last program's tile
    assert _check(x, "nvfp4", None) == ""
    assert _check(x, "nvfp4", blocks // 8) == ""  # chunks over one program, several of them


@needs_triton
@lane_only
def test_nvfp4_e4m3_block_scale_ties_and_subnormals():
    """Block maxima 6 * s with s on e4m3 rounding ties (normal and subnormal) under a tensor scale G = 1: the
    largest s is 448 itself, the edge of k (G = 1/2 would move the subnormal ties)."""
    s = [448.0, 1.0625, 1.1875, 3 * 2.0**-10, 5 * 2.0**-10, 2.0**-10, 2.0**-11, 0.0, 15 * 2.0**-10, 440.0]
    x = torch.zeros(len(s), 16)
    x[:, 0] = torch.tensor(s) * 6
    x[:, 1:] = x[:, :1] * torch.linspace(-1, 1, 15)
    assert _check(x, "nvfp4", None) == ""
    # The block scales the reference took are the e4m3 roundings (ties to even) that this test means.
    eff = qat.quantizers.minmax_qparams(x, _spec("nvfp4"))[0].flatten()
    assert eff[1:8].tolist() == [1.0, 1.25, 2.0**-8, 2.0**-8, 2.0**-9, 2.0**-9, 2.0**-9]


@needs_triton
@lane_only
def test_mxfp4_saturates_blocks_rounded_down():
    """compressed-tensors' exponent keeps maxima in [1.5, 1.75) x 2^e at 2^(e-2): they saturate to 6 x 2^(e-2)."""
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    x[:, 0] = torch.tensor([1.5, 1.625, 1.74, 1.75, 1.9, 3.2, 6.5, 7.0]) * 4
    for dtype in DTYPES:
        assert _check(x.to(dtype), "mxfp4", None) == ""
    out = fused_fp4_fake_quant_rows(x, "mxfp4")
    assert out[:3, 0].tolist() == [6.0, 6.0, 6.0]  # 2^(2-2) * 6: below the block's max
    assert out[3, 0].item() == 8.0  # 1.75 x 4 rounds the exponent up: 2^1 * 4, no saturation


@needs_triton
@lane_only
@pytest.mark.parametrize("fmt", sorted(FP4_FORMATS))
def test_nan_and_inf_blocks_match_reference(fmt):
    x = _sample(12, fmt, torch.float32, seed=3)
    x[7, 2], x[8, 1], x[9, 4] = float("nan"), float("inf"), -float("inf")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy on NaN / inf, in the interpreter
        errors = [_check(x.to(dt), fmt, gr) for dt in (torch.float32, torch.bfloat16) for gr in (None, 3)]
    assert [e for e in errors if e] == []


@needs_triton
@lane_only
@pytest.mark.parametrize("fmt", sorted(FP4_FORMATS))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_gradient_is_the_reference_clamp_aware_ste(fmt, dtype, kernel_calls, monkeypatch):
    x0 = _sample(24, fmt, dtype, seed=4)
    x0[9, :4] = torch.tensor([7.0, -7.5, 1.0, 0.5]).to(dtype) * 1e3  # saturating values: no gradient
    g = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5)).to(dtype)

    def grad(**kw):
        x = x0.clone().requires_grad_(True)
        out = fake_quant(x, _spec(fmt), global_rows=6, **kw)
        out.backward(g)
        return out.detach(), x.grad

    out_k, grad_k = grad()
    assert kernel_calls["fp4_fake_quant"] == 1
    monkeypatch.setattr(qat.quantizers, "fused_fp4_fake_quant_rows", lambda *a: None)
    out_r, grad_r = grad()
    assert kernel_calls["fp4_fake_quant"] == 1
    assert same_bits(out_k, out_r) and same_bits(grad_k, grad_r)
    assert (grad_r == 0).any() and (grad_r != 0).any()  # some values saturated, the others pass


@needs_triton
@lane_only
@pytest.mark.parametrize("scheme", ["nvfp4", "mxfp4"])
def test_quant_linear_through_the_kernel_matches_reference(scheme, kernel_calls, monkeypatch):
    from torch import nn

    from qat.linear import QuantLinear
    from qat.spec import parse

    spec = parse(scheme)
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=True, dtype=torch.bfloat16)
    ql = QuantLinear.from_linear(lin, spec.weight, spec.activation)
    x0 = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    x0[0, 3, ::5] *= 50
    dy = torch.randn(2, 5, 48, dtype=torch.bfloat16)

    fused, ref = kernel_and_reference(ql, x0, dy, monkeypatch, "fused_fp4_fake_quant_rows", kernel_calls,
                                      "fp4_fake_quant")
    for name, a, b in zip(("output", "input grad", "weight grad", "bias grad"), fused, ref):
        assert torch.equal(a, b), name


@needs_triton
@lane_only
def test_e4m3_rounding_helper_against_torch():
    """round_e4m3 on fp32 values across e4m3's range (subnormals, ties, 448) against torch's float8_e4m3fn cast."""
    import triton
    import triton.language as tl

    from qat.kernels.fp4_quant import round_e4m3

    globals()["round_e4m3"] = round_e4m3  # a jit function resolves the functions it calls in its globals

    @triton.jit
    def kernel(x_ptr, o_ptr, N, BLOCK: tl.constexpr):
        c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(o_ptr + c, round_e4m3(tl.load(x_ptr + c, mask=c < N, other=0.0)), mask=c < N)

    g = torch.Generator().manual_seed(0)
    e4m3 = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # every finite value >= 0
    mids = (e4m3[1:] + e4m3[:-1]) / 2  # every tie
    x = torch.cat([e4m3, mids, mids.nextafter(torch.tensor(0.0)), mids.nextafter(torch.tensor(500.0)),
                   torch.rand(1 << 14, generator=g) * 448, torch.exp2(torch.rand(1 << 14, generator=g) * 20 - 12)])
    x = x.clamp_max(448.0)
    out = torch.empty_like(x)
    kernel[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), BLOCK=4096)
    assert torch.equal(out, x.to(torch.float8_e4m3fn).float())


# CUDA: the compiled kernel at real sizes (per-token activations of 4096 channels, 4096 x 4096 weights).
CUDA_CASES = [("nvfp4", 8192 * 256, 256), ("nvfp4", 4096 * 256, None), ("nvfp4", 2048 * 688, 688),
              ("mxfp4", 8192 * 128, 128), ("mxfp4", 4096 * 128, None)]


@needs_cuda
@pytest.mark.parametrize("fmt,blocks,global_rows", CUDA_CASES)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_cuda_matches_reference(fmt, blocks, global_rows, dtype):
    x = _sample(blocks, fmt, dtype, seed=blocks).cuda()
    assert _check(x, fmt, global_rows) == ""
    x.requires_grad_(True)
    g = torch.randn_like(x)
    k = torch.autograd.grad(fused_fp4_fake_quant_rows(x, fmt, global_rows), x, g)[0]
    r = torch.autograd.grad(fake_quant(x, _spec(fmt), use_kernel=False, global_rows=global_rows), x, g)[0]
    assert same_bits(k, r)


def test_rows_the_kernel_does_not_take_fall_back_to_reference(monkeypatch):
    x = torch.randn(8, 16)
    assert fused_fp4_fake_quant_rows(x, "mxfp4") is None  # 16 wide: not an MXFP4 block
    assert fused_fp4_fake_quant_rows(x.double(), "nvfp4") is None
    assert fused_fp4_fake_quant_rows(x, "nvfp4", global_rows=3) is None  # the reference names the error
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert fused_fp4_fake_quant_rows(x, "nvfp4") is None  # CPU without the interpreter: no device path

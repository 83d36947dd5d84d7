"""The integer runtime ops (qat.runtime.ops) against the fake-quant numerics and exact integer arithmetic.

- CPU reference: dequantized weights equal the trained fake-quant weights bit for bit; per-token int8
  activation codes reproduce the fake-quant activation exactly; the W*A8 accumulation equals an int64
  computation from the codes, and its output the fp32 epilogue of that exact sum.
- tinygemm (aten._weight_int4pack_mm): its scale/zero convention through the op's CPU variant, the pack
  cache and the self-check that disables it on a mismatch.

The Triton kernels are tested in tests/test_export_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LANE
from helpers.int_ref import convert_weight, int64_group_acc, outlier_acts, outlier_weight, weight_spec

# CPU tensors take the reference path but in the device lane's own tests (conftest's no_interpreter).
pytestmark = pytest.mark.usefixtures("no_interpreter")

# ---------------------------------------------------------------------------------------------
# CPU reference.


WEIGHT_CASES = [
    (bits, sym, group, dtype)
    for bits in (4, 8, 3)
    for sym in (True, False)
    for group in (None, 32, 64)
    for dtype in (torch.bfloat16,)
] + [(4, True, 32, torch.float16), (4, False, None, torch.float32), (8, False, 64, torch.float16),
     (2, False, 32, torch.bfloat16)]


@pytest.mark.lane
@pytest.mark.parametrize("bits,sym,group,dtype", WEIGHT_CASES)
def test_dequantize_equals_fake_quant(bits, sym, group, dtype, kernel_calls):
    from qat.runtime.ops import dequantize_weight

    w = outlier_weight(48, 128, dtype, seed=bits)
    fq, qweight, scale, zero, g, u, zu = convert_weight(w, weight_spec(bits, sym, group))
    out = dequantize_weight(qweight, scale, zero, bits, g, 128, dtype)
    assert out.dtype == dtype and torch.equal(out, fq)
    assert kernel_calls["dequantize"] == (1 if LANE and bits in (2, 4, 8) else 0)  # the lane: the Triton kernel
    # And against float64 arithmetic on the codes themselves.
    z = torch.full(scale.shape, 1 << (bits - 1)) if zu is None else zu
    w64 = (u - z.repeat_interleave(g, 1)).double() * scale.double().repeat_interleave(g, 1)
    assert torch.equal(out, w64.to(dtype))


@pytest.mark.lane
def test_dequantize_clipping_scales():
    """mse-searched (clipping) scales: codes at the grid edges still dequantize to the fake-quant weight."""
    from qat.runtime.ops import dequantize_weight

    for sym in (True, False):
        w = outlier_weight(32, 64, torch.bfloat16, seed=5)
        fq, qweight, scale, zero, g, _, _ = convert_weight(w, weight_spec(4, sym, 32, method="mse"))
        assert torch.equal(dequantize_weight(qweight, scale, zero, 4, g, 64, torch.bfloat16), fq)


@pytest.mark.lane
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("sym", [True, False])
def test_quantize_act_int8_equals_fake_quant(dtype, sym, kernel_calls):
    from qat.quantizers import fake_quant
    from qat.runtime.ops import quantize_act_int8
    from qat.spec import TensorSpec

    x = outlier_acts((9, 96), dtype)
    spec = TensorSpec(bits=8, symmetric=sym, granularity="token")
    ref = fake_quant(x, spec, use_kernel=False)
    xq, xs, xz = quantize_act_int8(x, sym)
    assert xq.dtype == torch.int8 and xs.dtype == torch.float32 and xs.shape == (9, 1)
    if sym:
        assert xz is None
        deq = xq.float() * xs
    else:
        assert xz.dtype == torch.int32 and xz.shape == (9, 1)
        assert int(xz.min()) >= -128 and int(xz.max()) <= 127
        deq = (xq.float() - xz.float()) * xs
    assert torch.equal(deq.to(dtype), ref)
    assert kernel_calls["quantize_act_int8"] == (1 if LANE else 0)
    centred = xq[1].int() - (0 if xz is None else xz[1])
    assert torch.equal(centred, torch.zeros_like(centred))  # the all-zero token: codes at the zero point
    assert bool(torch.isfinite(xs).all())


@pytest.mark.lane
@pytest.mark.parametrize("bits,wsym,group,asym_act", [
    (4, True, 32, False), (4, False, None, True), (8, True, None, False), (8, False, 32, True),
    (3, False, 64, False), (2, True, 32, True),
])
def test_linear_a8_integer_accumulation_exact(bits, wsym, group, asym_act, kernel_calls):
    from qat.runtime.ops import linear_a8, quantize_act_int8, resolve_impl
    from qat.runtime.reference import a8_epilogue_reference, group_accumulate_reference

    k, n = 128, 48
    w = outlier_weight(n, k, torch.bfloat16, seed=bits)
    fq, qweight, scale, zero, g, u, zu = convert_weight(w, weight_spec(bits, wsym, group))
    x = outlier_acts((2, 3, k), torch.bfloat16)
    bias = torch.randn(n).bfloat16()
    xq, xs, xz = quantize_act_int8(x.reshape(-1, k), not asym_act)
    acc = group_accumulate_reference(xq, xz, qweight, zero, bits, g, k)
    exact = int64_group_acc(xq, xz, u, zu, bits, g)
    assert torch.equal(acc, exact.double()) and torch.equal(acc.long(), exact)
    y = linear_a8(x, qweight, scale, zero, bits, g, k, act_symmetric=not asym_act, bias=bias)
    assert y.shape == (2, 3, n) and y.dtype == torch.bfloat16
    want = a8_epilogue_reference(exact.double(), xs, scale, bias, torch.bfloat16)
    if resolve_impl(None, bits, True, 6, n, k, g, x) == "dequant":
        # The device path's fallback for widths the int8 kernel does not take (3 bits): the fake-quant model's own
        # bf16 product of the dequantized activation and weight, one bf16 rounding of each operand from exact.
        bound = x.double().abs().reshape(-1, k) @ fq.double().abs().t() + bias.double().abs()
        tol = 3 * torch.finfo(torch.bfloat16).eps * bound
        assert bool(((y.reshape(-1, n).double() - want.double()).abs() <= tol).all())
    else:
        assert torch.equal(y.reshape(-1, n), want)
        assert kernel_calls["linear_a8"] == (1 if LANE else 0)


def test_linear_a8_extreme_codes_exact():
    """Codes at both ends of the grids (products 255 * 255) over a long group still sum exactly."""
    from qat.runtime.reference import group_accumulate_reference

    k, n = 4096, 4
    u = torch.tensor([0, 255]).repeat(n, k // 2)
    qweight = (u - 128).to(torch.int8)
    zero = torch.full((n, 1), 127, dtype=torch.int8)  # z_u = 255
    xq = torch.tensor([-128, 127], dtype=torch.int8).repeat(3, k // 2)
    xz = torch.full((3, 1), 127, dtype=torch.int32)
    acc = group_accumulate_reference(xq, xz, qweight, zero, 8, k, k)
    exact = int64_group_acc(xq, xz, u, zero.to(torch.int64) + 128, 8, k)
    assert torch.equal(acc.long(), exact) and int(exact.abs().max()) == 255 * 255 * k // 2


@pytest.mark.lane
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_a16_reference(dtype):
    from qat.runtime.ops import linear_a16, resolve_impl

    w = outlier_weight(48, 128, dtype)
    fq, qweight, scale, zero, g, _, _ = convert_weight(w, weight_spec(4, False, 32))
    x, bias = outlier_acts((5, 128), dtype), torch.randn(48).to(dtype)
    y = linear_a16(x, qweight, scale, zero, 4, g, 128, bias=bias)
    if resolve_impl(None, 4, False, 5, 48, 128, g, x) == "tinygemm":  # the device path at small M, bf16
        # tinygemm takes the asymmetric zero as a bf16 float and accumulates in its own order
        bound = x.double().abs() @ fq.double().abs().t() + bias.double().abs()
        assert bool(((y.double() - F.linear(x, fq, bias).double()).abs() <= 2 * torch.finfo(dtype).eps * bound).all())
    else:
        assert torch.equal(y, F.linear(x, fq, bias))  # the fake-quant model's own linear


@pytest.mark.lane
def test_linear_a8_close_to_fake_quant_model():
    """The integer path computes the fake-quant model's product, only more exactly (one rounding)."""
    from qat.quantizers import fake_quant
    from qat.runtime.ops import linear_a8
    from qat.spec import TensorSpec

    w = outlier_weight(48, 128, torch.float32)
    fq, qweight, scale, zero, g, _, _ = convert_weight(w, weight_spec(4, True, 32))
    x = outlier_acts((7, 128), torch.float32)
    xf = fake_quant(x, TensorSpec(bits=8, symmetric=False, granularity="token"), use_kernel=False)
    y = linear_a8(x, qweight, scale, zero, 4, g, 128, act_symmetric=False)
    truth = xf.double() @ fq.double().t()
    bound = xf.double().abs() @ fq.double().abs().t()
    assert bool(((y.double() - truth).abs() <= 1e-6 * bound + 1e-30).all())


def test_layout_errors_and_dispatch(monkeypatch):
    from qat.runtime import ops

    qweight = torch.zeros(4, 8, dtype=torch.int32)  # 4 bits x 64 columns
    scale = torch.ones(4, 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="group_size"):
        ops.dequantize_weight(qweight, scale, None, 4, 48, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="scale"):
        ops.dequantize_weight(qweight, scale[:, :1], None, 4, 32, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="qweight"):
        ops.dequantize_weight(qweight[:, :7], scale, None, 4, 32, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="features"):
        ops.linear_a16(torch.zeros(2, 32), qweight, scale, None, 4, 32, 64)
    assert ops.linear_a8(torch.zeros(0, 64), qweight, scale, None, 4, 32, 64, True).shape == (0, 4)
    # One table decides; every path has an entry for every M.
    for path in ops.DISPATCH:
        for m in (1, 16, 64, 65, 4096, 1 << 40):
            assert ops.choose_impl(path, m) in ops.IMPLS[path]
    assert ops.path_name(4, False) == "w4a16" and ops.path_name(3, True) == "w4a8"
    assert ops.path_name(8, True) == "w8a8"
    monkeypatch.setenv("DISTQAT_INT_KERNELS", "0")
    assert not ops.kernels_enabled()
    monkeypatch.setenv("DISTQAT_INT_KERNELS", "1")
    assert ops.kernels_enabled()


# ---------------------------------------------------------------------------------------------
# tinygemm (aten._weight_int4pack_mm): the scale/zero convention through torch's CPU variant of the op.

HAVE_TINYGEMM_CPU = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
needs_tinygemm_cpu = pytest.mark.skipif(not HAVE_TINYGEMM_CPU, reason="torch lacks _weight_int4pack_mm_for_cpu")


@pytest.fixture
def fresh_tinygemm(monkeypatch):
    from qat.runtime import tinygemm

    monkeypatch.setitem(tinygemm._tinygemm_state, "disabled", None)
    return tinygemm


@needs_tinygemm_cpu
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_tinygemm_scale_zero_convention_cpu(sym, group, fresh_tinygemm, monkeypatch):
    """(u - 8) * scale + zero with zero = (8 - z) * scale is our (u - z) * scale: tinygemm's output is
    the fake-quant linear within bf16 rounding (asymmetric zeros are rounded to bf16), and the repacked
    weight is built once and cached on the qweight tensor."""
    from qat.runtime import ops

    tg = fresh_tinygemm
    k, n = 512, 48
    w = outlier_weight(n, k, torch.bfloat16, seed=group)
    fq, qweight, scale, zero, g, _, _ = convert_weight(w, weight_spec(4, sym, group))
    x, bias = outlier_acts((3, 2, k), torch.bfloat16), torch.randn(n).bfloat16()
    assert ops.resolve_impl("tinygemm", 4, False, 6, n, k, g, x) == "tinygemm"
    built = []
    pack = tg._tinygemm_pack
    monkeypatch.setattr(tg, "_tinygemm_pack", lambda *a: built.append(1) or pack(*a))
    for _ in range(2):
        y = ops.linear_a16(x, qweight, scale, zero, 4, g, k, bias=bias, impl="tinygemm")
        ref = ops.linear_a16(x, qweight, scale, zero, 4, g, k, bias=bias, impl="reference")
        bound = x.double().abs() @ fq.double().abs().t() + bias.double().abs()
        assert y.shape == (3, 2, n) and y.dtype == torch.bfloat16
        assert bool(((y.double() - ref.double()).abs() <= 2 * torch.finfo(torch.bfloat16).eps * bound).all())
    assert len(built) == 1 and tg._tinygemm_state["disabled"] is None
    # The (G, N, 2) table itself: zero 0 when symmetric, (8 - z) * scale otherwise.
    sz = tg.tinygemm_scales_and_zeros(scale, zero)
    assert sz.shape == (k // g, n, 2) and torch.equal(sz[..., 0], scale.t())
    zf = torch.zeros(n, k // g) if zero is None else (8 - zero.float()) * scale.float()
    assert torch.equal(sz[..., 1], zf.t().bfloat16())


@needs_tinygemm_cpu
def test_tinygemm_self_check_falls_back(fresh_tinygemm, monkeypatch):
    """A packing that disagrees with the dequantized weight is caught on first use: one warning, the
    reference result, and tinygemm is never chosen again in the process."""
    from qat.runtime import ops

    tg = fresh_tinygemm
    k, n = 256, 32
    w = outlier_weight(n, k, torch.bfloat16)
    fq, qweight, scale, zero, g, _, _ = convert_weight(w, weight_spec(4, True, 64))
    x = outlier_acts((2, k), torch.bfloat16)
    pack = tg._tinygemm_pack
    monkeypatch.setattr(tg, "_tinygemm_pack", lambda u, tiles: pack(15 - u, tiles))  # a wrong convention
    with pytest.warns(RuntimeWarning, match="tinygemm"):
        y = ops.linear_a16(x, qweight, scale, zero, 4, g, k, impl="tinygemm")
    assert torch.equal(y, F.linear(x, fq))
    assert tg._tinygemm_state["disabled"] is not None and not hasattr(qweight, tg._TINYGEMM_ATTR)
    assert ops.resolve_impl("tinygemm", 4, False, 2, n, k, g, x) == "reference"
    # Shapes and dtypes it does not take fall back without building anything.
    monkeypatch.setitem(tg._tinygemm_state, "disabled", None)
    assert ops.resolve_impl("tinygemm", 4, False, 2, n, k, g, x.float()) == "reference"
    assert ops.resolve_impl("tinygemm", 3, False, 2, n, k, g, x) == "reference"
    assert ops.resolve_impl("tinygemm", 4, False, 2, n, k, 512, x) == "reference"
    assert ops.resolve_impl("tinygemm", 4, True, 2, n, k, g, x) == "reference"
    assert ops.resolve_impl("tinygemm", 4, False, 2, 40, k, g, x) == "reference"  # N % 16

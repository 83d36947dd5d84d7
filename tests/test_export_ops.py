"""The integer runtime ops (qat.export.ops) against the fake-quant numerics and exact integer arithmetic.

- CPU reference: dequantized weights equal the trained fake-quant weights bit for bit; per-token int8
  activation codes reproduce the fake-quant activation exactly; the W*A8 accumulation equals an int64
  computation from the codes, and its output the fp32 epilogue of that exact sum.
- Triton kernels in the interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so they
  run in a subprocess: `python tests/test_export_ops.py interpreter`): dequantization and activation
  codes exactly, W*A8 outputs exactly without split-K (same fp32 epilogue order) and within fp32
  rounding with it, W*A16 within one output ulp of the reference (the GEMV, which does not round the
  weight to the activation dtype, within two).
- tinygemm (aten._weight_int4pack_mm): its scale/zero convention through the op's CPU variant, the pack
  cache and the self-check that disables it on a mismatch.
- Offline compilation (no GPU): every Triton kernel with every tile configuration its launcher can pick
  compiles for sm_90 (TTIR; every seventh to a cubin, within an H100's shared memory).
- CUDA (only with a GPU): the compiled kernels and every dispatch choice at real sizes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs a CUDA GPU and triton")


def _weight(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random weight with an outlier row, a zero row and an all-positive row (asymmetric grids)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, ::5] *= 40
    w[1] = 0
    w[2] = w[2].abs() + 0.01
    return w.to(dtype)


def _acts(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """Activations with outlier columns, an all-zero token, an all-negative and a tiny-valued token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x2 = x.view(-1, shape[-1])
    x2[:, 3] *= 60
    if x2.shape[0] > 1:
        x2[1] = 0
    if x2.shape[0] > 2:
        x2[2] = -x2[2].abs() - 0.1
    if x2.shape[0] > 3:
        x2[3] *= 1e-5
    return x.to(dtype)


def _spec(bits: int, symmetric: bool, group: int | None, method: str = "minmax"):
    from qat.spec import TensorSpec

    gran = "group" if group else "channel"
    return TensorSpec(bits=bits, symmetric=symmetric, granularity=gran, group_size=group, scale_method=method)


def convert(w: torch.Tensor, spec):
    """(fake-quant weight, qweight, scale, zero, group_size, unsigned codes, unsigned zeros) as convert + load
    lay them out: packed unsigned codes (int8 signed ones for 8 bits), zeros in the matching domain."""
    from qat.export.pack import pack_int32
    from qat.quantizers import WeightQuantizer

    wq = WeightQuantizer(spec, w)
    with torch.no_grad():
        fq = wq(w)
    codes, scale, zero = wq.quantize(w)
    bits, k = spec.bits, w.shape[1]
    u = (codes + (1 << (bits - 1)) if spec.symmetric else codes).to(torch.int64)
    zu = None if zero is None else zero.to(torch.int64)
    if bits == 8:
        qweight = (u - 128).to(torch.int8)
        z = None if zu is None else (zu - 128).to(torch.int8)
    else:
        qweight = pack_int32(u.to(torch.int32), bits)
        z = None if zu is None else zu.to(torch.uint8)
    return fq, qweight, scale.to(w.dtype), z, spec.group_size or k, u, zu


def int64_group_acc(xq, xz, u, zu, bits, group_size):
    """(G, M, N) int64: sum over each group of (xq - xz) * (u - z_u), from the codes, elementwise."""
    xi = xq.to(torch.int64) - (0 if xz is None else xz.to(torch.int64))
    n, k = u.shape
    z = torch.full((n, k // group_size), 1 << (bits - 1), dtype=torch.int64) if zu is None else zu
    wi = u - z.repeat_interleave(group_size, dim=1)
    prod = xi[:, None, :] * wi[None, :, :]  # (M, N, K)
    return prod.reshape(xi.shape[0], n, -1, group_size).sum(-1).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# CPU reference.


@pytest.fixture(autouse=True)
def _no_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors take the reference path in this process


WEIGHT_CASES = [
    (bits, sym, group, dtype)
    for bits in (4, 8, 3)
    for sym in (True, False)
    for group in (None, 32, 64)
    for dtype in (torch.bfloat16,)
] + [(4, True, 32, torch.float16), (4, False, None, torch.float32), (8, False, 64, torch.float16),
     (2, False, 32, torch.bfloat16)]


@pytest.mark.parametrize("bits,sym,group,dtype", WEIGHT_CASES)
def test_dequantize_equals_fake_quant(bits, sym, group, dtype):
    from qat.export.ops import dequantize_weight

    w = _weight(48, 128, dtype, seed=bits)
    fq, qweight, scale, zero, g, u, zu = convert(w, _spec(bits, sym, group))
    out = dequantize_weight(qweight, scale, zero, bits, g, 128, dtype)
    assert out.dtype == dtype and torch.equal(out, fq)
    # And against float64 arithmetic on the codes themselves.
    z = torch.full(scale.shape, 1 << (bits - 1)) if zu is None else zu
    w64 = (u - z.repeat_interleave(g, 1)).double() * scale.double().repeat_interleave(g, 1)
    assert torch.equal(out, w64.to(dtype))


def test_dequantize_clipping_scales():
    """mse-searched (clipping) scales: codes at the grid edges still dequantize to the fake-quant weight."""
    from qat.export.ops import dequantize_weight

    for sym in (True, False):
        w = _weight(32, 64, torch.bfloat16, seed=5)
        fq, qweight, scale, zero, g, _, _ = convert(w, _spec(4, sym, 32, method="mse"))
        assert torch.equal(dequantize_weight(qweight, scale, zero, 4, g, 64, torch.bfloat16), fq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("sym", [True, False])
def test_quantize_act_int8_equals_fake_quant(dtype, sym):
    from qat.export.ops import quantize_act_int8
    from qat.quantizers import fake_quant
    from qat.spec import TensorSpec

    x = _acts((9, 96), dtype)
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
    centred = xq[1].int() - (0 if xz is None else xz[1])
    assert torch.equal(centred, torch.zeros_like(centred))  # the all-zero token: codes at the zero point
    assert bool(torch.isfinite(xs).all())


@pytest.mark.parametrize("bits,wsym,group,asym_act", [
    (4, True, 32, False), (4, False, None, True), (8, True, None, False), (8, False, 32, True),
    (3, False, 64, False), (2, True, 32, True),
])
def test_linear_a8_integer_accumulation_exact(bits, wsym, group, asym_act):
    from qat.export.ops import a8_epilogue_reference, group_accumulate_reference, linear_a8, quantize_act_int8

    k, n = 128, 48
    w = _weight(n, k, torch.bfloat16, seed=bits)
    _, qweight, scale, zero, g, u, zu = convert(w, _spec(bits, wsym, group))
    x = _acts((2, 3, k), torch.bfloat16)
    bias = torch.randn(n).bfloat16()
    xq, xs, xz = quantize_act_int8(x.reshape(-1, k), not asym_act)
    acc = group_accumulate_reference(xq, xz, qweight, zero, bits, g, k)
    exact = int64_group_acc(xq, xz, u, zu, bits, g)
    assert torch.equal(acc, exact.double()) and torch.equal(acc.long(), exact)
    y = linear_a8(x, qweight, scale, zero, bits, g, k, act_symmetric=not asym_act, bias=bias)
    assert y.shape == (2, 3, n) and y.dtype == torch.bfloat16
    assert torch.equal(y.reshape(-1, n), a8_epilogue_reference(exact.double(), xs, scale, bias, torch.bfloat16))


def test_linear_a8_extreme_codes_exact():
    """Codes at both ends of the grids (products 255 * 255) over a long group still sum exactly."""
    from qat.export.ops import group_accumulate_reference

    k, n = 4096, 4
    u = torch.tensor([0, 255]).repeat(n, k // 2)
    qweight = (u - 128).to(torch.int8)
    zero = torch.full((n, 1), 127, dtype=torch.int8)  # z_u = 255
    xq = torch.tensor([-128, 127], dtype=torch.int8).repeat(3, k // 2)
    xz = torch.full((3, 1), 127, dtype=torch.int32)
    acc = group_accumulate_reference(xq, xz, qweight, zero, 8, k, k)
    exact = int64_group_acc(xq, xz, u, zero.to(torch.int64) + 128, 8, k)
    assert torch.equal(acc.long(), exact) and int(exact.abs().max()) == 255 * 255 * k // 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_a16_reference(dtype):
    from qat.export.ops import linear_a16

    w = _weight(48, 128, dtype)
    fq, qweight, scale, zero, g, _, _ = convert(w, _spec(4, False, 32))
    x, bias = _acts((5, 128), dtype), torch.randn(48).to(dtype)
    y = linear_a16(x, qweight, scale, zero, 4, g, 128, bias=bias)
    assert torch.equal(y, F.linear(x, fq, bias))  # the fake-quant model's own linear


def test_linear_a8_close_to_fake_quant_model():
    """The integer path computes the fake-quant model's product, only more exactly (one rounding)."""
    from qat.export.ops import linear_a8
    from qat.quantizers import fake_quant
    from qat.spec import TensorSpec

    w = _weight(48, 128, torch.float32)
    fq, qweight, scale, zero, g, _, _ = convert(w, _spec(4, True, 32))
    x = _acts((7, 128), torch.float32)
    xf = fake_quant(x, TensorSpec(bits=8, symmetric=False, granularity="token"), use_kernel=False)
    y = linear_a8(x, qweight, scale, zero, 4, g, 128, act_symmetric=False)
    truth = xf.double() @ fq.double().t()
    bound = xf.double().abs() @ fq.double().abs().t()
    assert bool(((y.double() - truth).abs() <= 1e-6 * bound + 1e-30).all())


def test_layout_errors_and_dispatch(monkeypatch):
    from qat.export import ops

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
# Triton kernels in the interpreter (a subprocess with TRITON_INTERPRET=1).

# (M, K, N, group (None: per channel), bits, weight symmetric, activation symmetric, dtype, bias)
KERNEL_CASES = [
    (1, 64, 32, 32, 4, True, True, torch.bfloat16, False),
    (5, 128, 48, 32, 4, False, False, torch.bfloat16, True),
    (33, 128, 48, None, 4, True, False, torch.float32, True),
    (33, 64, 32, None, 8, True, True, torch.bfloat16, False),
    (5, 128, 48, None, 8, False, False, torch.float16, True),
    (1, 128, 48, None, 8, False, True, torch.bfloat16, True),
    (5, 64, 32, 32, 2, False, True, torch.bfloat16, False),
    (33, 128, 32, 32, 8, False, False, torch.bfloat16, True),
    (5, 128, 48, 64, 4, False, True, torch.float16, False),
    (1, 256, 32, None, 8, True, False, torch.bfloat16, True),  # a8 split-K inside one group
    (3, 256, 32, None, 4, False, True, torch.float32, False),
    (1, 384, 32, None, 4, True, True, torch.bfloat16, False),  # a group split into 3 parts
    (2, 1024, 48, 128, 4, False, True, torch.bfloat16, True),  # gemv: several K tiles and splits
]


def _ulp_close(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype) -> bool:
    """|out - ref| within two roundings to dtype plus fp32 accumulation, relative to sum |x||w|."""
    eps = torch.finfo(dtype).eps
    tol = (eps + 1e-5) * bound + 1e-30
    return bool(((out.double() - ref.double()).abs() <= tol).all())


def _check_interpreter() -> list[str]:
    from qat.export import ops, triton_ops

    errors = []

    def no_split(fn, *args):
        saved = triton_ops._num_sms
        triton_ops._num_sms = lambda index: 0  # no split-K: the epilogue's fp32 order equals the reference
        try:
            return fn(*args)
        finally:
            triton_ops._num_sms = saved

    for i, (m, k, n, group, bits, wsym, asym_act, dtype, has_bias) in enumerate(KERNEL_CASES):
        where = f"case {i} M={m} K={k} N={n} g={group} bits={bits} wsym={wsym} act_sym={asym_act} {dtype}"
        w = _weight(n, k, dtype, seed=i)
        fq, qweight, scale, zero, g, _, _ = convert(w, _spec(bits, wsym, group))
        x = _acts((m, k), dtype, seed=i)
        bias = torch.randn(n, generator=torch.Generator().manual_seed(i)).to(dtype) if has_bias else None
        bound = x.double().abs() @ fq.double().abs().t() + (0 if bias is None else bias.double().abs())

        deq = triton_ops.dequantize(qweight, scale, zero, bits, g, k, dtype)
        if not torch.equal(deq, fq):
            errors.append(f"{where}: dequantize differs from the fake-quant weight")
        if not torch.equal(ops.dequantize_weight(qweight, scale, zero, bits, g, k, dtype), fq):
            errors.append(f"{where}: ops.dequantize_weight (dispatched) differs")

        ref16 = ops.linear_a16(x, qweight, scale, zero, bits, g, k, bias=bias, impl="reference")
        gemv = []
        if triton_ops.gemv_supported(bits, g, dtype):
            gemv = [("gemv split", triton_ops.linear_gemv(x, qweight, scale, zero, bits, g, bias)),
                    ("gemv no split", no_split(triton_ops.linear_gemv, x, qweight, scale, zero, bits, g, bias)),
                    ("gemv dispatched", ops.linear_a16(x, qweight, scale, zero, bits, g, k, bias=bias, impl="gemv"))]
        elif ops.resolve_impl("gemv", bits, False, m, n, k, g, x) != "triton":
            errors.append(f"{where}: gemv without support does not fall back to triton")
        for name, out in gemv + [("split", triton_ops.linear_a16(x, qweight, scale, zero, bits, g, bias)),
                          ("no split", no_split(triton_ops.linear_a16, x, qweight, scale, zero, bits, g, bias)),
                          ("dispatched", ops.linear_a16(x, qweight, scale, zero, bits, g, k, bias=bias))]:
            # The GEMV multiplies x by (code - zero) * scale in fp32, without first rounding the weight to
            # x.dtype as the fake-quant linear (and the tensor-core kernel) does: one more rounding apart.
            tol = 2 if name.startswith("gemv") else 1
            if out.dtype != dtype or not _ulp_close(out, ref16, tol * bound, dtype):
                errors.append(f"{where}: a16 {name} differs by {(out.double() - ref16.double()).abs().max()}")

        act_sym = not asym_act
        rq = ops._quantize_act_reference(x, act_sym)
        kq = triton_ops.quantize_act_int8(x, act_sym)
        if not (torch.equal(rq[0], kq[0]) and torch.equal(rq[1], kq[1])
                and (rq[2] is None and kq[2] is None or torch.equal(rq[2], kq[2]))):
            errors.append(f"{where}: activation codes/scales/zeros differ")

        ref8 = ops.linear_a8(x, qweight, scale, zero, bits, g, k, act_sym, bias=bias, impl="reference")
        exact = no_split(triton_ops.linear_a8, *kq, qweight, scale, zero, bits, g, bias, dtype)
        if not torch.equal(exact, ref8):
            errors.append(f"{where}: a8 without split differs by {(exact.double() - ref8.double()).abs().max()}")
        bound8 = bound * 1.02 + ref8.double().abs()  # quantized activations are within 1/255 of x
        for name, out in (("split", triton_ops.linear_a8(*kq, qweight, scale, zero, bits, g, bias, dtype)),
                          ("dispatched", ops.linear_a8(x, qweight, scale, zero, bits, g, k, act_sym, bias=bias))):
            if out.dtype != dtype or not _ulp_close(out, ref8, bound8, dtype):
                errors.append(f"{where}: a8 {name} differs by {(out.double() - ref8.double()).abs().max()}")

    # The kill switch sends everything to the reference even where kernels could run.
    os.environ["DISTQAT_INT_KERNELS"] = "0"
    try:
        import qat.export.triton_ops as T

        saved, T.linear_a8 = T.linear_a8, None  # would raise if called
        w = _weight(32, 64, torch.bfloat16)
        _, qweight, scale, zero, g, _, _ = convert(w, _spec(4, True, 32))
        ops.linear_a8(_acts((3, 64), torch.bfloat16), qweight, scale, zero, 4, g, 64, True)
        T.linear_a8 = saved
    except TypeError:
        errors.append("DISTQAT_INT_KERNELS=0 still ran the Triton a8 kernel")
    finally:
        os.environ.pop("DISTQAT_INT_KERNELS")
    # 3-D input through the dispatcher, bits without a kernel (3) fall back to the reference.
    w = _weight(32, 64, torch.bfloat16)
    fq, qweight, scale, zero, g, _, _ = convert(w, _spec(3, False, 32))
    x = _acts((2, 3, 64), torch.bfloat16)
    y = ops.linear_a16(x, qweight, scale, zero, 3, g, 64)
    if y.shape != (2, 3, 32) or not torch.equal(y, F.linear(x, fq)):
        errors.append("3-bit a16 fallback differs from F.linear on the fake-quant weight")
    return errors


CHECKS = {"interpreter": _check_interpreter}


@needs_triton
def test_triton_kernels_in_interpreter():
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    env.pop("DISTQAT_INT_KERNELS", None)
    proc = subprocess.run([sys.executable, __file__, "interpreter"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"interpreter checks failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert "OK" in proc.stdout


# ---------------------------------------------------------------------------------------------
# tinygemm (aten._weight_int4pack_mm): the scale/zero convention through torch's CPU variant of the op.

HAVE_TINYGEMM_CPU = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
needs_tinygemm_cpu = pytest.mark.skipif(not HAVE_TINYGEMM_CPU, reason="torch lacks _weight_int4pack_mm_for_cpu")


@pytest.fixture
def fresh_tinygemm(monkeypatch):
    from qat.export import tinygemm

    monkeypatch.setitem(tinygemm._tinygemm_state, "disabled", None)
    return tinygemm


@needs_tinygemm_cpu
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_tinygemm_scale_zero_convention_cpu(sym, group, fresh_tinygemm, monkeypatch):
    """(u - 8) * scale + zero with zero = (8 - z) * scale is our (u - z) * scale: tinygemm's output is
    the fake-quant linear within bf16 rounding (asymmetric zeros are rounded to bf16), and the repacked
    weight is built once and cached on the qweight tensor."""
    from qat.export import ops

    tg = fresh_tinygemm
    k, n = 512, 48
    w = _weight(n, k, torch.bfloat16, seed=group)
    fq, qweight, scale, zero, g, _, _ = convert(w, _spec(4, sym, group))
    x, bias = _acts((3, 2, k), torch.bfloat16), torch.randn(n).bfloat16()
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
    from qat.export import ops

    tg = fresh_tinygemm
    k, n = 256, 32
    w = _weight(n, k, torch.bfloat16)
    fq, qweight, scale, zero, g, _, _ = convert(w, _spec(4, True, 64))
    x = _acts((2, k), torch.bfloat16)
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


# ---------------------------------------------------------------------------------------------
# Offline compilation for a CUDA target: the interpreter (TRITON_INTERPRET=1) runs no compiler checks,
# so a kernel can pass every interpreter test and still not compile (tl.dot's dtype and shape rules).
# No GPU needed: Triton's frontend and NVIDIA backend (bundled ptxas) run on any machine.

SM90_MAX_SHARED = 232448  # bytes of shared memory one H100 block may opt into


def _compile_offline(case: dict, target, last: str):
    """Run triton's stages for `case` (a triton_ops.compile_cases entry) up to `last`; (module, metadata)."""
    from triton._C.libtriton import ir
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    src = ASTSource(fn=case["fn"], signature=case["signature"], constexprs=case["constexprs"])
    backend = make_backend(target)
    options = backend.parse_options(dict(case["options"]))
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         ctx)
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    metadata: dict = {}
    for ext, run in stages.items():
        module = run(module, metadata)
        if ext == last:
            break
    return module, metadata


def _offline_target():
    try:
        from triton._C.libtriton import ir  # noqa: F401
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource  # noqa: F401
        from triton.compiler.compiler import make_backend

        target = GPUTarget("cuda", 90, 32)
        make_backend(target)
        return target
    except Exception as e:  # an API this test does not know: skip rather than fail
        pytest.skip(f"offline triton compilation unavailable here ({type(e).__name__}: {e})")


@needs_triton
@pytest.mark.parametrize("part", ["a8", "a16", "gemv", "dequant", "act_quant"])
def test_kernels_compile_for_cuda_offline(part, monkeypatch):
    """Every Triton kernel with every tile configuration its launcher can choose compiles to TTIR for
    sm_90; every seventh case goes on to a cubin (bundled ptxas) and must fit in an H100's shared memory."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    code = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import test_export_ops as t
from qat.export import triton_ops
target = t._offline_target_or_exit()
cases = [c for c in triton_ops.compile_cases(flag_variants=False) if c["name"].split()[0] == {part!r}]
assert cases, "no cases"
failures = []
for i, case in enumerate(cases):
    last = "cubin" if i % 7 == 0 else "ttir"
    try:
        _, md = t._compile_offline(case, target, last)
    except Exception as e:
        failures.append(f"{{case['name']}} ({{last}}): {{type(e).__name__}}: {{str(e)[-1500:]}}")
        continue
    if last == "cubin" and md.get("shared", 0) > t.SM90_MAX_SHARED:
        failures.append(f"{{case['name']}}: {{md['shared']}} bytes of shared memory")
print("\\n".join(failures) or f"OK {{len(cases)}}")
"""
    # A subprocess: TRITON_INTERPRET is read when the kernels are defined.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip()[-500:])
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1].startswith("OK"), \
        f"{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"


def test_int_dots_name_their_out_dtype():
    """triton <= 3.6 defaults tl.dot's out_dtype to fp32 and rejects an int32 accumulator (the W*A8
    kernel failed so on an H100); triton >= 3.9 infers it, so compiling with a new triton cannot catch
    this. Every tl.dot given an accumulator must name out_dtype."""
    import ast

    tree = ast.parse((ROOT / "qat" / "export" / "triton_ops.py").read_text())
    dots = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "dot" and isinstance(n.func.value, ast.Name) and n.func.value.id == "tl"]
    assert dots
    for call in dots:
        has_acc = len(call.args) >= 3 or any(kw.arg == "acc" for kw in call.keywords)
        if has_acc:
            assert any(kw.arg == "out_dtype" for kw in call.keywords), f"line {call.lineno}: tl.dot without out_dtype"


def _offline_target_or_exit():
    try:
        return _offline_target()
    except BaseException as e:  # pytest.skip outside pytest: exit 77, the caller skips
        print(f"skip: {e}")
        sys.exit(77)


# ---------------------------------------------------------------------------------------------
# CUDA: the compiled kernels at real sizes, every implementation of every path.

CUDA_CASES = [
    (4, True, 128, True), (4, False, 128, False), (4, True, None, True), (8, True, None, True),
    (8, False, None, False), (8, True, 128, True),
]


@needs_cuda
@pytest.mark.parametrize("bits,wsym,group,act_sym", CUDA_CASES)
@pytest.mark.parametrize("m", [1, 16, 100, 1024])
def test_cuda_paths_match_reference(bits, wsym, group, act_sym, m, monkeypatch):
    from qat.export import ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k, n = 4096, 1024
    w = _weight(n, k, torch.bfloat16, seed=m)
    fq, qweight, scale, zero, g, _, _ = (t.cuda() if isinstance(t, torch.Tensor) else t
                                         for t in convert(w, _spec(bits, wsym, group)))
    x = _acts((m, k), torch.bfloat16, seed=m).cuda()
    bias = torch.randn(n, device="cuda").bfloat16()
    assert torch.equal(ops.dequantize_weight(qweight, scale, zero, bits, g, k, torch.bfloat16), fq)
    bound = x.double().abs() @ fq.double().abs().t() + bias.double().abs()
    ref16 = ops.linear_a16(x, qweight, scale, zero, bits, g, k, bias=bias, impl="reference")
    for impl in ops.IMPLS[ops.path_name(bits, False)] + (None,):
        out = ops.linear_a16(x, qweight, scale, zero, bits, g, k, bias=bias, impl=impl)
        # tinygemm rounds an asymmetric zero to bf16 and may accumulate differently: twice the bound.
        tol = 2 if impl in ("tinygemm", "gemv", None) else 1
        assert _ulp_close(out, ref16, tol * bound, torch.bfloat16), f"a16 {impl}"
    from qat.export import tinygemm

    if bits == 4 and group in tinygemm.TINYGEMM_GROUPS:  # the packing convention held on this GPU
        assert tinygemm._tinygemm_state["disabled"] is None, tinygemm._tinygemm_state["disabled"]
    rq = ops._quantize_act_reference(x, act_sym)
    kq = ops.quantize_act_int8(x, act_sym)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(rq, kq))
    ref8 = ops.linear_a8(x, qweight, scale, zero, bits, g, k, act_sym, bias=bias, impl="reference")
    for impl in ops.IMPLS[ops.path_name(bits, True)] + (None,):
        out = ops.linear_a8(x, qweight, scale, zero, bits, g, k, act_sym, bias=bias, impl=impl)
        assert _ulp_close(out, ref8, bound * 1.02 + ref8.double().abs(), torch.bfloat16), f"a8 {impl}"


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=RuntimeWarning)
    failures = CHECKS[sys.argv[1]]()
    for f in failures:
        print("FAIL", f)
    print("OK" if not failures else f"{len(failures)} failures")
    sys.exit(1 if failures else 0)

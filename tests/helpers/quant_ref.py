"""The float64 reference of qat.quantizers, written from the maths rather than from the module's helpers, and the
deterministic inputs its tests share (tests/test_quantizers.py states the grids; test_quantizer_properties.py,
test_quant_gradients.py and test_quantlinear.py test against the same reference)."""

from __future__ import annotations

import math
import zlib

import torch

from qat.spec import TensorSpec

F64 = torch.float64
BF16 = torch.bfloat16
STE_RTOL = 2.5e-7  # clipping STE: autograd computes (g * s) / s in fp32, i.e. g up to ~2 ulp
TIE_REL = 1e-5  # |frac(x/s) - 0.5| below this (relative to |x/s|) counts as a tie fp32 may break differently

# QLoRA's NormalFloat-4 levels (bitsandbytes), written out independently of qat.quantizers.NF4_LEVELS.
NF4_REF = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=F64)
E4M3_MAX = 448.0


# ---------------------------------------------------------------------------------------------
# Deterministic inputs: a fresh generator per case, seeded from the case's parameters.


def seeded_gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def rand_weight(shape, *key) -> torch.Tensor:
    """Random normal rows of different magnitudes and offsets; row 0 all positive, row 1 all negative."""
    g = seeded_gen("weight", shape, *key)
    w = torch.randn(shape, generator=g) * torch.exp(0.5 * torch.randn(shape[0], 1, generator=g))
    w = w + 0.3 * torch.randn(shape[0], 1, generator=g)
    w[0] = w[0].abs() + 0.05
    w[1] = -w[1].abs() - 0.05
    return w


def rand_act(shape, *key) -> torch.Tensor:
    g = seeded_gen("act", shape, *key)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g))
    return x + 0.5 * torch.randn(*shape[:-1], 1, generator=g)


# ---------------------------------------------------------------------------------------------
# float64 reference.


def ref_grid(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def ref_weight_rows(w: torch.Tensor, granularity: str, group: int | None) -> torch.Tensor:
    out, inp = w.shape
    if granularity == "tensor":
        return w.reshape(1, out * inp)
    if granularity == "channel":
        return w.reshape(out, inp)
    assert inp % group == 0
    return w.reshape(out, inp // group, group).reshape(out * (inp // group), group)


def ref_act_rows(x: torch.Tensor, granularity: str) -> torch.Tensor:
    return x.reshape(1, -1) if granularity == "tensor" else x.reshape(-1, x.shape[-1])


def ref_range(lo, hi, bits, symmetric, grid="full"):
    """float64 (scale, zero) mapping [lo, hi] (per row) onto the integer grid. Symmetric, by `grid` (sym_range):
    full, absmax over half the code span, (qmax - qmin) / 2 (compressed-tensors' and torchao's symmetric scale);
    qmax, absmax over qmax; signed, the larger of hi / qmax and lo / qmin."""
    qmin, qmax = ref_grid(bits, symmetric)
    if symmetric and grid == "signed":
        return torch.maximum(hi.clamp(min=0) / qmax, lo.clamp(max=0) / qmin).clamp_min(1e-8), None
    if symmetric:
        top = (qmax - qmin) / 2 if grid == "full" else qmax
        return (torch.maximum(lo.abs(), hi.abs()) / top).clamp_min(1e-8), None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    s = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    return s, torch.round(-lo / s).clamp(qmin, qmax)


def ref_minmax(rows, bits, symmetric, grid="full"):
    return ref_range(rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True), bits, symmetric, grid)


def ref_percentile(rows, bits, symmetric, p, grid="full"):
    """Nearest-rank percentile per row: the ceil(p/100 * n)-th smallest (of |x| when symmetric)."""
    n = rows.shape[-1]
    k = min(n, max(1, math.ceil(p / 100.0 * n)))
    if symmetric:
        hi = rows.abs().sort(-1).values[:, k - 1 : k]
        return ref_range(-hi, hi, bits, symmetric, grid)
    srt = rows.sort(-1).values
    return ref_range(srt[:, n - k : n - k + 1], srt[:, k - 1 : k], bits, symmetric)


def ref_codes(rows, s, z, bits, symmetric):
    qmin, qmax = ref_grid(bits, symmetric)
    q = torch.round(rows / s)  # round half to even
    if z is not None:
        q = q + z
    return q.clamp(qmin, qmax)


def ref_designed_ties(rows, s, bits):
    """Symmetric rows' values at qmin + 1/2 steps: a row's negative absmax on the full signed range, where fp32
    rounding picks qmin or qmin + 1 (as it does in compressed-tensors)."""
    qmin, _ = ref_grid(bits, True)
    return (rows / s - (qmin + 0.5)).abs() < 1e-4


def ref_codes_taking_ties(rows, s, bits, taken):
    """Symmetric reference codes, with the designed ties resolved as `taken` (the fp32 path's codes) did; each taken
    code there must be one of the two neighbours."""
    ref = ref_codes(rows, s, None, bits, True)
    tie = ref_designed_ties(rows, s, bits)
    taken = taken.to(ref.dtype)
    assert ((taken - ref).abs()[tie] <= 1).all()
    return torch.where(tie, taken, ref)


def ref_dequant(codes, s, z):
    return (codes - z) * s if z is not None else codes * s


def ref_near_tie(rows, s, top=None):
    """Values whose x / s is within rounding of a half step. With `top` (the grid's largest code, in units of s
    before any zero point is added), ties above it are left out: both neighbours clamp to the top code (the full
    signed range puts every row's positive absmax at qmax + 1/2)."""
    t = rows / s
    tie = ((t - t.floor()) - 0.5).abs() < TIE_REL * t.abs().clamp_min(1.0)
    return tie if top is None else tie & (t < top)


def ref_fp8(rows, s):
    y = (rows / s).clamp(-E4M3_MAX, E4M3_MAX)
    return y.to(torch.float8_e4m3fn).to(F64) * s


def ref_nf4_codes(rows, s):
    return (rows / s).unsqueeze(-1).sub(NF4_REF).abs().argmin(-1)


def assert_int_matches_ref(out_rows, rows, s, z, bits, symmetric, codes=None):
    """fp32 fake-quant rows (and optionally int codes) equal the float64 reference given (s, z).

    Away from ties: |out - ref| <= 1e-6 * (|ref| + s) (a few fp32 ulps) and identical codes.
    At near-ties: the code may differ by one step (and the value by one scale).
    """
    ref_c = ref_codes(rows, s, z, bits, symmetric)
    deq = ref_dequant(ref_c, s, z)
    qmin, qmax = ref_grid(bits, symmetric)
    tie = ref_near_tie(rows, s, qmax - (0 if z is None else z))
    # The full signed range puts a row's negative absmax at qmin + 1/2 by design (a tie in every such row, as in
    # compressed-tensors): allowed, but not counted as the accidental ties that would make the comparison hollow.
    designed = (rows / s - (qmin + 0.5)).abs() < 1e-4 if symmetric else torch.zeros_like(tie)
    assert (tie & ~designed).double().mean() < 0.01, "too many near-ties: the comparison would be hollow"
    err = (out_rows.double() - deq).abs()
    tol = 1e-6 * (deq.abs() + s)
    bad = (err > tol) & ~(tie & (err <= s * (1 + 1e-5)))
    assert not bad.any(), f"{int(bad.sum())} values off the float64 reference; max err/s {float((err / s).max())}"
    if codes is not None:
        diff = codes.double() - ref_c
        assert torch.equal(diff[~tie], torch.zeros_like(diff[~tie])), "codes differ from the reference"
        assert diff.abs().max() <= 1


def spec_id(spec: TensorSpec) -> str:
    parts = [spec.format + str(spec.bits), "sym" if spec.symmetric else "asym", spec.granularity]
    if spec.group_size:
        parts.append(f"g{spec.group_size}")
    if spec.scale_method != "minmax":
        parts.append(spec.scale_method)
    if spec.learnable != "none":
        parts.append(spec.learnable)
    return "-".join(parts)


BITS = (2, 3, 4, 8)


def kernel_and_reference(ql, x0: torch.Tensor, dy: torch.Tensor, monkeypatch, kernel: str, kernel_calls, key: str):
    """A QuantLinear's forward and backward through a fused fake-quant kernel, then with `qat.quantizers.<kernel>`
    switched off (the torch reference): the (output, input grad, weight grad, bias grad) of each run. Asserts that
    the weight and the input both went through the kernel in the first run, and nothing did in the second."""
    import qat.quantizers  # lazy: a kernel test imports qat only after the lane decided on interpret mode

    def run():
        ql.weight.grad = ql.bias.grad = None
        x = x0.clone().requires_grad_(True)
        y = ql(x)
        y.backward(dy)
        return y.detach(), x.grad, ql.weight.grad, ql.bias.grad

    fused = run()
    assert kernel_calls[key] == 2
    monkeypatch.setattr(qat.quantizers, kernel, lambda *a, **k: None)
    ref = run()
    assert kernel_calls[key] == 2
    return fused, ref


INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (the sign of zero included), except that any NaN matches any NaN (payloads differ
    by device)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    nan = torch.isnan(a)
    if not torch.equal(nan, torch.isnan(b)):
        return False
    iv = INT_VIEW[a.dtype]
    return torch.equal(a.masked_fill(nan, 0).contiguous().view(iv), b.masked_fill(nan, 0).contiguous().view(iv))


def kernel_mismatch(out, ref: torch.Tensor, where: str) -> str:
    """'' when a kernel's output (None: it declined) has the reference's bits, else what differs, prefixed by
    `where`."""
    if out is None:
        return f"{where}: the kernel returned None"
    if same_bits(out, ref):
        return ""
    bad = (out.float() != ref.float()) & ~(torch.isnan(out) & torch.isnan(ref))
    return (f"{where}: {int(bad.sum())} elements differ (max |diff| {(out.float() - ref.float())[bad].abs().max()}), "
            f"e.g. rows {bad.reshape(-1, out.shape[-1]).any(-1).nonzero().flatten()[:5].tolist()}")

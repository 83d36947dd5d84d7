"""The symmetric integer grids. `full` against compressed-tensors' own reference code: the same scale (absmax over
half the code span, 7.5 at 4 bits), the same levels and codes, the same RTN weight bit for bit. `signed` (the
weights' default) against its float64 definition, max(max / qmax, min / qmin): the smallest scale that clips
neither end. Exported folders of both that compressed-tensors decompresses to our weights, the code -8 included."""

from __future__ import annotations

import pytest
import torch
from helpers.models import tiny_llama
from helpers.readers import compressed_tensors_weights

from qat.apply import quantize_model
from qat.export import convert_model, load_quantized
from qat.linear import QuantLinear
from qat.quantizers import WeightQuantizer, minmax_qparams, quantize_codes, weight_rows
from qat.spec import QuantSpec, TensorSpec, legacy_sym_range, parse

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import fake_quantize, quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, calculate_range  # noqa: E402

F64 = torch.float64


def _weight(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=F64) * 0.05
    w[::3, 1] = -0.4  # rows whose absmax is negative: the code -8 is theirs
    return w.float().double()  # fp32 values, so both sides start from the same range


def _args(bits, group):
    strategy = "group" if group else "channel"
    return QuantizationArgs(num_bits=bits, symmetric=True, strategy=strategy, group_size=group)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [None, 32])
def test_scale_and_levels_match_compressed_tensors_in_float64(bits, group):
    spec = TensorSpec(bits=bits, granularity="group" if group else "channel", group_size=group,
                      sym_range="full").check("weight")
    args = _args(bits, group)
    lo, hi = calculate_range(args, torch.device("cpu"))
    assert (spec.qmin, spec.qmax) == (int(lo), int(hi)) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    rows = weight_rows(_weight((12, 64), bits), spec)
    ref_scale, _ = calculate_qparams(rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True), args)
    assert ref_scale.dtype == F64
    # float64: our range_qparams' arithmetic on the same float64 range is compressed-tensors', exactly
    ours, zero = minmax_qparams(rows, spec)  # fp32, as distqat stores scales
    assert zero is None
    torch.testing.assert_close(ref_scale, rows.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 0.5), rtol=0, atol=0)
    assert torch.equal(ours, ref_scale.float())  # the correctly rounded fp32 of the float64 scale
    # the same scale gives the same codes from both (every level used: -2^(b-1) at negative absmaxes)
    r32 = rows.float()
    codes = quantize_codes(r32, ours, None, spec)
    ref_codes = quantize(r32, ours, torch.zeros_like(ours), args)
    assert torch.equal(codes.float(), ref_codes)
    assert int(codes.min()) == spec.qmin and int(codes.max()) == spec.qmax
    # the positive absmax is clipped by at most half a step, nothing else moves more than half a step
    err = (codes.double() * ours.double() - r32.double()).abs() / ours.double()
    assert float(err.max()) <= 0.5 + 1e-4  # plus the fp32 scale's rounding, times up to 128 steps


@pytest.mark.parametrize("bits,group", [(4, 64), (4, None), (8, None)])
def test_rtn_weight_equals_compressed_tensors_fake_quant(bits, group):
    """distqat's RTN weight is compressed-tensors' (llm-compressor's RTN) bit for bit in fp32."""
    spec = TensorSpec(bits=bits, granularity="group" if group else "channel", group_size=group,
                      sym_range="full").check("weight")
    w = _weight((24, 128), 7 + bits).float()
    ours = WeightQuantizer(spec, w)(w)
    args = _args(bits, group)
    g = group or w.shape[1]
    wg = w.reshape(w.shape[0], -1, g)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
    ref = fake_quantize(w, scale, zp, args)
    assert torch.equal(ours, ref)
    old = WeightQuantizer(TensorSpec(bits=bits, granularity=spec.granularity, group_size=group, sym_range="qmax"), w)
    assert not torch.equal(old(w), ref)  # the qmax grid is another grid


@pytest.mark.parametrize("grid", ["signed", "full"])
def test_export_keeps_the_grid_and_compressed_tensors_decompresses_it(tmp_path, grid):
    model = tiny_llama()
    spec = parse("w4g32")
    spec.weight.sym_range = grid
    quantize_model(model, spec.check())
    codes = [m.weight_quantizer.quantize(m.weight)[0] for m in model.modules() if isinstance(m, QuantLinear)
             and m.weight_quantizer is not None]
    assert any(int(c.min()) == -8 for c in codes) and all(int(c.max()) <= 7 for c in codes)
    out = convert_model(model, tmp_path / "int")
    rt = load_quantized(out)
    dense = compressed_tensors_weights(out)
    assert dense
    for name, w in dense.items():
        ours = rt.get_submodule(name).dequantized_weight(torch.float32)
        assert torch.equal(w.float(), ours) and torch.equal(ours, model.get_submodule(name).quantized_weight().float())


def test_old_records_keep_the_qmax_grid():
    old = parse("w4g64a8kv8").to_dict()
    for kind in ("weight", "activation", "kv"):
        del old[kind]["sym_range"]
    spec = QuantSpec.from_dict(old)
    assert (spec.weight.sym_range, spec.kv.sym_range, spec.activation.sym_range) == ("qmax", "qmax", "full")
    assert spec.weight.q_range == 7.0
    assert TensorSpec(bits=4, sym_range="full").check("weight").q_range == 7.5
    assert spec.name == "w4g64a8kv8"  # an old record keeps its name (the grid is not part of one)
    new = parse("w4g64a8symkv8")
    assert (new.weight.sym_range, new.activation.sym_range, new.kv.sym_range) == ("signed", "full", "qmax")
    assert QuantSpec.from_dict(new.to_dict()).weight.sym_range == "signed"  # a new record keeps its grid
    assert TensorSpec(bits=8, granularity="token").check("kv").q_range == 127.0  # a kv spec naming no grid
    assert TensorSpec(bits=8, granularity="token").check("activation").q_range == 127.5
    assert parse("w4g64a8symkv8").name == "w4g64a8symkv8"  # the defaults keep their short names
    assert legacy_sym_range({"sym_range": "full"}, "weight") == {"sym_range": "full"}
    with pytest.raises(ValueError, match="sym_range=qmax"):
        TensorSpec(bits=8, granularity="token", sym_range="qmax").check("activation")

    with pytest.raises(ValueError, match="only symmetric int weights take the signed grid"):
        TensorSpec(bits=8, granularity="token", sym_range="signed").check("kv")
    with pytest.raises(ValueError, match="it has no q_range"):
        _ = parse("w4").weight.q_range


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 16])
def test_signed_scale_is_the_smallest_that_clips_neither_end(bits, group):
    spec = TensorSpec(bits=bits, granularity="group" if group else "channel", group_size=group).check("weight")
    assert spec.sym_range == "signed"  # the weights' default
    w = _weight((12, 64), bits)
    w[1::3, 2] = 0.45  # rows whose absmax is positive
    rows = weight_rows(w, spec)
    ours, zero = minmax_qparams(rows, spec)
    assert zero is None
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    ref = torch.maximum(rows.amax(-1, keepdim=True) / qmax, rows.amin(-1, keepdim=True) / qmin)
    # fp32 division of the fp32 extremes, correctly rounded: within an fp32 ulp of the float64 scale
    torch.testing.assert_close(ours.double(), ref, rtol=2.0**-23, atol=0)
    codes = quantize_codes(rows.float(), ours, None, spec)
    # No row is clipped: every value is within half a step of its code, the extreme side lands on its end code.
    err = (codes.double() * ours.double() - rows).abs() / ours.double()
    assert float(err.max()) <= 0.5 + 1e-4
    neg = rows.amin(-1).abs() * qmax > rows.amax(-1) * -qmin  # rows the min decides
    assert torch.equal(codes.amin(-1)[neg], torch.full_like(codes.amin(-1)[neg], qmin))
    assert torch.equal(codes.amax(-1)[~neg], torch.full_like(codes.amax(-1)[~neg], qmax))
    assert bool(neg.any()) and bool((~neg).any())
    # never coarser than qmax's grid, never finer than absmax / -qmin
    absmax = rows.abs().amax(-1, keepdim=True)
    assert bool((ref <= absmax / qmax).all()) and bool((ref >= absmax / -qmin).all())


def test_signed_rtn_error_is_below_both_absmax_grids_on_outlier_rows():
    """Where one end of a row is far out (the rows a channel's scale is set by), the signed grid's RTN error is
    below the full range's (which clips a positive extreme by half a step) and qmax's (coarser steps)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[:32, 0], w[32:, 0] = 0.3, -0.3
    errs = {}
    for grid in ("signed", "full", "qmax"):
        spec = TensorSpec(bits=4, sym_range=grid).check("weight")
        errs[grid] = float((WeightQuantizer(spec, w)(w).double() - w.double()).pow(2).sum())
    assert errs["signed"] < errs["full"] and errs["signed"] < errs["qmax"]

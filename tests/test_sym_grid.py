"""The symmetric integer grid over the full signed range, against compressed-tensors' own reference code: the same
scale (absmax over half the code span, 7.5 at 4 bits), the same levels and codes, the same RTN weight bit for bit,
and an exported folder that compressed-tensors decompresses to our weights, the code -8 included."""

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
    spec = TensorSpec(bits=bits, granularity="group" if group else "channel", group_size=group).check("weight")
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
    spec = TensorSpec(bits=bits, granularity="group" if group else "channel", group_size=group).check("weight")
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


def test_export_keeps_the_full_range_and_compressed_tensors_decompresses_it(tmp_path):
    model = tiny_llama()
    quantize_model(model, "w4g32")
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
    assert spec.weight.q_range == 7.0 and parse("w4g64").weight.q_range == 7.5
    new = parse("w4g64a8symkv8")
    assert (new.weight.sym_range, new.activation.sym_range, new.kv.sym_range) == ("full", "full", "qmax")
    assert TensorSpec(bits=8, granularity="token").check("kv").q_range == 127.0  # a kv spec naming no grid
    assert TensorSpec(bits=8, granularity="token").check("activation").q_range == 127.5
    assert parse("w4g64a8symkv8").name == "w4g64a8symkv8"  # the defaults keep their short names
    assert legacy_sym_range({"sym_range": "full"}, "weight") == {"sym_range": "full"}
    with pytest.raises(ValueError, match="sym_range=qmax"):
        TensorSpec(bits=8, granularity="token", sym_range="qmax").check("activation")

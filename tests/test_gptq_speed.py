"""The fast GPTQ (qat/ptq/gptq.py, gptq_clip.py) against the algorithm it replaced (tests/helpers/gptq_ref.py): the
same codes and scales, in float64 exactly, in float32 to its rounding; bench/gptq_speed.py measures the speed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from qat.ptq.gptq import damped_inverse_cholesky, gptq
from qat.ptq.gptq_clip import clip_qparams
from qat.quantizers import mse_qparams
from qat.spec import parse
from tests.helpers.gptq_ref import gptq_reference

F64 = torch.float64


def problem(out: int, d: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Hessian of correlated inputs with a few outlier channels and one that never fires."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d, dtype=F64) + torch.randn(d, d, generator=g, dtype=F64) / d**0.5
    x = torch.randn(2 * d, d, generator=g, dtype=F64) @ mix
    x[:, :3] *= 8.0
    x[:, 5] = 0.0  # a dead input: its column is zeroed and carries no error
    w = torch.randn(out, d, generator=g, dtype=F64)
    return w.to(dtype), (x.T @ x / len(x)).to(dtype)


# act-order with static groups, static groups in order, groups computed as GPTQ reaches them
ORDERS = [(True, True), (False, True), (False, False)]


@pytest.mark.parametrize("scheme", ["w4g64", "w3g32asym", "w4", "w4asym", "wnf4g64", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("act_order,static", ORDERS)
@pytest.mark.parametrize("clip", [False, True])
def test_fast_gptq_gives_the_previous_algorithms_result_in_float64(scheme, act_order, static, clip):
    # 320 inputs: more than one block of 128 and a triangular inverse split in halves (above 256)
    spec = parse(scheme).weight
    if clip:
        spec = replace(spec, scale_method="mse")
    w, h = problem(12, 320, F64)
    q, codes, scale, zero = gptq(w, h, spec, 0.1, 128, act_order, static, F64)
    q0, codes0, scale0, zero0 = gptq_reference(w, h, spec, 0.1, 128, act_order, static, F64)
    assert torch.equal(codes, codes0)
    assert torch.equal(scale, scale0)
    assert zero is None and zero0 is None or torch.equal(zero, zero0)
    torch.testing.assert_close(q, q0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scheme", ["w4g64", "w3g32asym", "wnf4g64"])
@pytest.mark.parametrize("act_order,static", ORDERS)
def test_fast_gptq_in_float32_differs_only_by_rounding(scheme, act_order, static):
    """In float32 the lazy updates sum in another order, so a code exactly between two levels may round the other
    way: at most one step, on a handful of entries."""
    spec = replace(parse(scheme).weight, scale_method="mse")
    w, h = problem(64, 320, torch.float32, seed=1)
    q, codes, scale, _ = gptq(w, h, spec, 0.1, 128, act_order, static, torch.float32)
    q0, codes0, scale0, _ = gptq_reference(w, h, spec, 0.1, 128, act_order, static, torch.float32)
    diff = (codes - codes0).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3
    if static or act_order:  # scales from the weight before any update: the same bits
        assert torch.equal(scale, scale0)
    else:
        torch.testing.assert_close(scale, scale0, rtol=1e-5, atol=0)


def rows_with_ties(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(200, n, generator=g)
    r[0] = 0.0  # every shrink gives error 0: the least shrink wins, as in mse_qparams' strict comparison
    r[1] = 0.25  # a constant row
    r[2, : n // 2], r[2, n // 2 :] = 1.0, -1.0  # two values only
    r[3] = torch.linspace(-1, 1, n)
    r[4] *= 1e-30  # subnormal errors
    r[5, 0] = 40.0  # one outlier
    return r


@pytest.mark.parametrize("scheme", ["w4g64", "w4g64asym", "w3g64asym", "w8g64", "wnf4g64", "w4"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_clip_qparams_is_mse_qparams(scheme, scale_dtype):
    spec = replace(parse(scheme).weight, scale_method="mse")
    rows = rows_with_ties(64)
    s, z = clip_qparams(rows, spec, scale_dtype)
    s0, z0 = mse_qparams(rows, spec, scale_dtype)
    assert torch.equal(s, s0)
    assert z is None and z0 is None or torch.equal(z, z0)
    assert s.shape == (200, 1)


def test_damped_inverse_cholesky_is_the_upper_factor_of_the_inverse():
    """One factorization of the reversed H and a triangular inverse (split twice at 600 columns) give the
    reference's Cholesky of the inverse."""
    _, h = problem(1, 600, F64)
    u = damped_inverse_cholesky(h.clone(), 0.1)
    hd = h.clone()
    hd.diagonal().add_(0.1 * hd.diagonal().mean())
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    torch.testing.assert_close(u, ref, rtol=0, atol=1e-9 * float(ref.abs().max()))
    torch.testing.assert_close(u.T @ u @ hd, torch.eye(600, dtype=F64), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="not positive definite"):
        damped_inverse_cholesky(-torch.eye(4, dtype=F64), 0.0)


def test_bench_times_both_methods_and_skips_an_absent_peer(tmp_path, capsys):
    from bench import gptq_speed

    out = tmp_path / "speed.json"
    argv = ["--threads", "1", "--rounds", "1", "--n-samples", "1", "--seq-len", "32", "--layer", "1",
            "--peer-python", str(tmp_path / "no-python"), "--json", str(out)]
    assert gptq_speed.main(argv) == 0
    captured = capsys.readouterr()
    assert "its column is skipped" in captured.err
    rows = json.loads(out.read_text())["rows"]
    assert [(r["weight"], r["method"]) for r in rows] == [
        (w, m) for w in ("q_proj", "gate_proj", "down_proj") for m in ("gptq", "gptq+clip")]
    assert all(r["ours_s"] > 0 and r["theirs_s"] is None and r["ratio"] is None for r in rows)
    assert "| 1 | down_proj | 576x1536 | gptq+clip |" in captured.out

"""Quantization specs: short names parse to the right fields and back; bad specs fail with a useful message."""

from __future__ import annotations

import pytest

from qat.spec import QuantSpec, SpecError, TensorSpec, check_layer, parse, resolve_for_layer

# short name -> {kind: (bits, symmetric, granularity, group_size, format) or None}
EXPECTED = {
    "w4a8kv8": {
        "weight": (4, True, "channel", None, "int"),
        "activation": (8, False, "token", None, "int"),
        "kv": (8, True, "token", None, "int"),
    },
    "w4g128": {"weight": (4, True, "group", 128, "int"), "activation": None, "kv": None},
    "w4g128a16": {"weight": (4, True, "group", 128, "int"), "activation": None, "kv": None},
    "w8a8": {"weight": (8, True, "channel", None, "int"), "activation": (8, False, "token", None, "int"), "kv": None},
    "w2g64": {"weight": (2, True, "group", 64, "int"), "activation": None, "kv": None},
    "w4a8kv4": {
        "weight": (4, True, "channel", None, "int"),
        "activation": (8, False, "token", None, "int"),
        "kv": (4, True, "token", None, "int"),
    },
    "fp8": {"weight": (8, True, "channel", None, "fp8"), "activation": (8, True, "token", None, "fp8"), "kv": None},
    "w4g64asym": {"weight": (4, False, "group", 64, "int"), "activation": None, "kv": None},
    "wnf4g64": {"weight": (4, True, "group", 64, "nf4"), "activation": None, "kv": None},
    "w3g64": {"weight": (3, True, "group", 64, "int"), "activation": None, "kv": None},
}
CANONICAL = {"w4g128a16": "w4g128"}


def _fields(t: TensorSpec | None):
    if t is None:
        return None
    return (t.bits, t.symmetric, t.granularity, t.group_size, t.format)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parse_fields(name):
    spec = parse(name)
    got = {kind: _fields(getattr(spec, kind)) for kind in ("weight", "activation", "kv")}
    assert got == EXPECTED[name]
    for kind in ("weight", "activation", "kv"):
        t = getattr(spec, kind)
        if t is not None:
            # the defaults every short name stands for: minmax, dynamic, nothing learned
            assert (t.scale_method, t.learnable, t.dynamic) == ("minmax", "none", True)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parse_round_trip(name):
    canonical = CANONICAL.get(name, name)
    assert parse(name).name == canonical
    assert parse(canonical).name == canonical
    assert parse(canonical) == parse(name)


def test_parse_is_case_and_space_insensitive():
    assert parse("  W4A8KV8 ") == parse("w4a8kv8")


def test_qmin_qmax():
    assert (TensorSpec(bits=4).qmin, TensorSpec(bits=4).qmax) == (-8, 7)
    assert (TensorSpec(bits=8).qmin, TensorSpec(bits=8).qmax) == (-128, 127)
    assert (TensorSpec(bits=2, symmetric=False).qmin, TensorSpec(bits=2, symmetric=False).qmax) == (0, 3)
    assert (TensorSpec(bits=8, symmetric=False).qmin, TensorSpec(bits=8, symmetric=False).qmax) == (0, 255)


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("garbage", "cannot parse quant scheme"),
        ("w4a8g64", "groups apply to weights only"),
        ("w4a16g64", "16-bit"),
        ("w9", "2..8 bits"),
        ("w1", "2..8 bits"),
        ("w4a8kv9", "2..8 bits"),
        ("w4anf4", "nf4 is a weight format"),
    ],
)
def test_parse_invalid(name, fragment):
    with pytest.raises(SpecError, match=fragment):
        parse(name)


@pytest.mark.parametrize(
    "kind, kwargs, fragment",
    [
        ("weight", dict(granularity="token"), "granularity=token is not possible for weight"),
        ("weight", dict(granularity="channel", group_size=64), "group_size goes with granularity=group"),
        ("weight", dict(granularity="group"), "group_size goes with granularity=group"),
        ("weight", dict(bits=9), "bits=9"),
        ("weight", dict(bits=1), "bits=1"),
        ("weight", dict(format="nf4", bits=3), "nf4 has 4 bits"),
        ("weight", dict(format="fp8", bits=4), "fp8 (e4m3) has 8 bits"),
        ("weight", dict(format="fp8", bits=8, symmetric=False), "set symmetric=true"),
        ("weight", dict(format="int4"), "is not one of"),
        ("weight", dict(dynamic=False), "weights have no dynamic/static choice"),
        ("kv", dict(granularity="tensor"), "dynamic kv scale must be per token or per head"),
        ("activation", dict(granularity="token", dynamic=False), "static (calibrated) scale is per-tensor"),
        ("activation", dict(granularity="token", learnable="lwc"), "learnable clipping is for weights only"),
        ("activation", dict(granularity="token", learnable="lsq"), "needs a static scale"),
        ("activation", dict(granularity="token", scale_method="mse"), "clipping search is for weights only"),
        ("activation", dict(granularity="channel"), "not possible for activation"),
    ],
)
def test_check_invalid(kind, kwargs, fragment):
    with pytest.raises(SpecError) as e:
        TensorSpec(**kwargs).check(kind)
    assert fragment in str(e.value)
    assert f"quant.{kind}" in str(e.value)


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("weight", dict(bits=4, granularity="group", group_size=3)),
        ("weight", dict(bits=2, symmetric=False, granularity="tensor", scale_method="mse")),
        ("weight", dict(bits=4, granularity="channel", learnable="lwc", symmetric=False)),
        ("activation", dict(bits=8, granularity="tensor", dynamic=False, learnable="lsq")),
        ("kv", dict(bits=4, granularity="head")),
    ],
)
def test_check_valid(kind, kwargs):
    spec = TensorSpec(**kwargs)
    assert spec.check(kind) is spec


def test_quantspec_check_names_bad_override():
    spec = QuantSpec(overrides={"*.down_proj": "w4a8g64"})
    with pytest.raises(SpecError, match=r"quant.overrides\['\*.down_proj'\]: .*groups apply to weights only"):
        spec.check()


def test_check_layer_group_divisors():
    spec = TensorSpec(bits=4, granularity="group", group_size=128)
    with pytest.raises(SpecError) as e:
        check_layer(spec, 576, "model.layers.0.mlp.down_proj")
    msg = str(e.value)
    assert "group_size=128" in msg and "in_features=576" in msg and "model.layers.0.mlp.down_proj" in msg
    assert "[32, 64]" in msg  # 576 = 9 * 64: 32 and 64 divide it, 128 and 256 do not
    # no power-of-two divisor at all: the message says to use a divisor of in_features
    with pytest.raises(SpecError, match="a divisor of 21"):
        check_layer(spec, 21, "odd")
    check_layer(spec, 256, "ok")  # divides: no error
    check_layer(TensorSpec(bits=4), 21, "per-channel")  # only groups are checked


def test_resolve_for_layer_first_match_wins():
    spec = parse("w4a8kv8")
    spec.include = ["model.*"]
    spec.exclude = ["lm_head"]
    spec.overrides = {"*.mlp.down_proj": "w8a8", "*.mlp.*": "w2g64", "*proj": "w4g128"}
    down = resolve_for_layer(spec, "model.layers.3.mlp.down_proj")
    assert _fields(down.weight) == (8, True, "channel", None, "int")
    assert _fields(down.activation) == (8, False, "token", None, "int")
    assert down.kv is None
    assert (down.include, down.exclude, down.overrides) == (["model.*"], ["lm_head"], {})
    up = resolve_for_layer(spec, "model.layers.3.mlp.up_proj")
    assert _fields(up.weight) == (2, True, "group", 64, "int") and up.activation is None
    q = resolve_for_layer(spec, "model.layers.3.self_attn.q_proj")
    assert _fields(q.weight) == (4, True, "group", 128, "int")
    assert resolve_for_layer(spec, "lm_head") is spec
    # order matters: the same patterns the other way round
    spec.overrides = {"*.mlp.*": "w2g64", "*.mlp.down_proj": "w8a8"}
    assert resolve_for_layer(spec, "model.layers.3.mlp.down_proj").weight.bits == 2


def test_quantspec_dict_round_trip():
    spec = parse("w4g64asym")
    spec.overrides = {"*.down_proj": "w8a8"}
    back = QuantSpec.from_dict(spec.to_dict())
    assert back == spec
    assert back.name == "w4g64asym"


def test_name_of_custom_spec_raises():
    spec = QuantSpec(weight=TensorSpec(bits=4, scale_method="mse"))
    with pytest.raises(SpecError, match="no short name"):
        _ = spec.name

"""Every mixture-of-experts family transformers builds, tiny and random (tests/helpers/moe.py), through
`quantize_model(model, "w4")`: either the report says >= 99% of the decoder's weight elements are fake-quantized and
a count made here, from the modules themselves, agrees; or quantize_model refuses with a one-line CoverageError that
names the parameter and the `quant.exclude=` fix, and following the fix gives a model it quantizes. Never a silent
pass: a family that does not build tiny is a skip with its reason, and the build test fails when fewer than 80% of
the families (or any of the six named ones) build."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

import pytest
import torch
from helpers.moe import (
    NAMED,
    build_tiny,
    expert_hits,
    experts_modules,
    fused_params,
    moe_families,
    sample_ids,
    tiny_moe,
)
from torch import nn

from qat.apply import quantize_model
from qat.coverage import CoverageError
from qat.experts import QuantExperts
from qat.linear import QuantLinear

FAMILIES = moe_families()
SHARE = 0.99  # quantized share of the decoder's weight elements a plain "w4" must reach
MIN_BUILT = 0.8
MAX_FIXES = 16  # refusals followed (each adds the exclude its message names) before the test gives up
LAYER_LISTS = ("layers", "blocks", "h")  # the decoder's ModuleList, by attribute name
ROUTER_PARTS = {"gate", "router", "shared_expert_gate"}  # a module path through one of these scores experts
NAME = re.compile(r"^([A-Za-z_][\w]*(?:\.[\w]+)+)[: ]")


def is_router(param: str) -> bool:
    return any(part in ROUTER_PARTS for part in param.split(".")[:-1])


NOT_MATMUL = {"A_log", "A", "D", "dt_bias", "sinks"}  # 2-D, but state-space decay/skip terms and attention sinks


def weights(model: nn.Module) -> dict[str, int]:
    """{parameter: elements} of the model's matmul weights (>= 2-D; biases, convolution kernels, state-space terms,
    routers, embeddings and the head aside)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings()
    tables |= {id(head.weight)} if head is not None else set()
    tables |= {id(p) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) for p in m.parameters()}
    return {n: p.numel() for n, p in model.named_parameters()
            if p.dim() >= 2 and not n.endswith("bias") and n.rsplit(".", 1)[-1] not in NOT_MATMUL
            and not is_router(n) and id(p) not in tables}


def in_decoder(model: nn.Module, found: dict[str, int]) -> dict[str, int]:
    """The part of `found` under the decoder's layer list(s)."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.split(".")[-1] in LAYER_LISTS]
    assert lists, f"no decoder layer list ({LAYER_LISTS}) in {type(model).__name__}"
    return {n: k for n, k in found.items() if any(n.startswith(f"{layers}.") for layers in lists)}


def fake_quantized(model: nn.Module) -> dict[str, int]:
    """{parameter: elements} of the weights the model now fake-quantizes: the weight of every QuantLinear with a
    weight quantizer, and what each QuantExperts lists in quantized_params()."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.weight_quantizer is not None:
            out[f"{name}.weight"] = m.weight.numel()
        elif isinstance(m, QuantExperts):
            out.update({f"{name}.{p}": getattr(m, p).numel() for p in m.quantized_params()})
    return out


def excluded(param: str, patterns: list[str]) -> bool:
    """Whether an exclude pattern matches the parameter's module or a module above it."""
    parts = param.split(".")[:-1]
    return any(fnmatchcase(".".join(parts[:i]), p) for p in patterns for i in range(1, len(parts) + 1))


def check_refusal(message: str, model: nn.Module) -> str:
    """The refusal is one line naming one of the model's parameters and the quant.exclude= fix; the pattern the fix
    offers (the wider one where it offers two)."""
    assert "\n" not in message, message
    named = NAME.match(message)
    assert named, f"the refusal names no parameter first: {message}"
    assert named.group(1) in dict(model.named_parameters()), f"{named.group(1)} is no parameter of the model"
    assert "quant.exclude=" in message, message
    patterns = re.findall(r"'([^']+)'", message.split("quant.exclude=", 1)[1])
    assert patterns, message
    return patterns[-1]


def quantize_following_fixes(family: str):
    """(the tiny model quantized "w4", its report, the excludes the refusals asked for on the way)."""
    excludes: list[str] = []
    for _ in range(MAX_FIXES + 1):
        model, _ = build_tiny(family)
        try:
            return model, quantize_model(model, "w4", exclude=["lm_head", "*.lm_head", *excludes]), excludes
        except CoverageError as e:
            pattern = check_refusal(str(e), model)
            assert pattern not in excludes, f"the fix the refusal names was followed already: {e}"
            excludes.append(pattern)
    pytest.fail(f"{family}: still refused after following {MAX_FIXES} fixes {excludes}")


def test_families_are_found_and_most_build_tiny():
    assert set(NAMED) <= set(FAMILIES), set(NAMED) - set(FAMILIES)
    reasons = {f: build_tiny(f)[1] for f in FAMILIES}
    built = {f for f, r in reasons.items() if r.startswith("built")}
    failed = {f: r for f, r in reasons.items() if f not in built}
    assert set(NAMED) <= built, failed
    assert len(built) >= MIN_BUILT * len(FAMILIES), failed
    for family in sorted(built):  # each a mixture of experts: fused expert weights present
        model, _ = build_tiny(family)
        assert experts_modules(model), f"{family} built without fused experts"
        assert model.config._experts_implementation == "eager"


@pytest.mark.parametrize("family", NAMED)
def test_tiny_moe_is_small_and_routes_tokens_to_every_expert(family):
    model = tiny_moe(family)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 100_000 < size < 800_000, size
    assert {p.dtype for p in model.parameters()} == {torch.float32} and not model.training
    assert model.config._experts_implementation == "eager"
    hits = expert_hits(model, sample_ids())
    want_layers = 2  # deepseek_v3: layer 0 dense, layers 1-2 sparse; the others: 2 sparse layers
    assert len(hits) == want_layers, hits
    for name, counts in hits.items():
        assert min(counts) >= 1, f"{family} {name}: an expert got no token of the sample: {counts}"
        assert sum(counts) == 2 * sample_ids().numel()  # top-2
    fused = {k for _, m in experts_modules(model) for k in fused_params(m)}
    assert fused == {"gate_up_proj", "down_proj"}


@pytest.mark.parametrize("family", FAMILIES)
def test_w4_quantizes_the_decoder_or_refuses_in_one_line(family):
    reference, reason = build_tiny(family)
    if reference is None:
        pytest.skip(reason)
    model, report, excludes = quantize_following_fixes(family)
    cov = report.coverage
    quantized = fake_quantized(model)
    assert sum(quantized.values()) == cov.quantized, (sorted(quantized), cov.to_dict())
    fused = sum(n for name, n in quantized.items() if isinstance(model.get_submodule(name.rpartition(".")[0]),
                                                                 QuantExperts))
    listed = sum(n for name, n in quantized.items() if ".experts." in name and name.endswith(".weight"))
    assert fused <= cov.kinds["experts"][0] <= fused + listed, (fused, listed, cov.kinds)  # + experts as linears
    assert not [n for n in quantized if is_router(n)], "routers stay full precision by default"
    assert not [n for n in quantized if "lm_head" in n or "embed" in n]
    everything = weights(reference)
    assert cov.total == sum(everything.values()), (cov.total, sum(everything.values()), cov.to_dict())
    decoder = in_decoder(reference, everything)
    for name, m in experts_modules(reference):  # every fused expert weight fake-quantized, or excluded on purpose
        live = model.get_submodule(name)
        for param in fused_params(m):
            if not excluded(f"{name}.{param}", excludes):
                assert isinstance(live, QuantExperts) and param in live.quantized_params(), f"{name}.{param}"
    mine = sum(n for name, n in quantized.items() if name in decoder) / sum(decoder.values())
    if not excludes:
        assert cov.share >= SHARE and mine >= SHARE, (cov.share, mine)
    with torch.no_grad():
        ids = sample_ids()
        want = reference(input_ids=ids, use_cache=False).logits
        got = model(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(got).all()
    err = float((got - want).norm() / want.norm())
    assert 1e-4 < err < 1.0, f"w4 changed the logits by {err:.2e} of their norm"

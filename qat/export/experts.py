"""Fused MoE experts in a converted folder: the names they are written under, their compressed-tensors entries, and
the `IntExperts` a folder loads them into.

transformers 5 holds a layer's experts as stacked tensors (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)) and
maps a family's original per-expert checkpoints onto them when loading (`conversion_mapping.py`: Qwen2/3-MoE, OLMoE,
DeepSeek-V3 `mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`, merged by `MergeModulelist` + `Concatenate`;
Mixtral `block_sparse_moe.experts.{e}.w1|w3|w2.weight` plus a `block_sparse_moe` -> `mlp` renaming), and reverses
that mapping on save (`revert_weight_conversion`). A converted folder uses the same names: `checkpoint_names` runs
transformers' own reversal on tracer tensors (each stacked row numbered) and reads off, for every expert and
projection, the checkpoint name and the rows of the stacked weight it holds, so no table here repeats the mapping.
Each such piece is written as one compressed-tensors linear (`weight_packed`/`weight`, `weight_scale`,
`weight_zero_point`, `weight_shape`), in the scheme a dense linear of that spec would get, which is what vLLM's
compressed-tensors MoE methods and transformers' expert decompression read.

A family with no mapping (gpt-oss: its original checkpoint holds the stacked, MXFP4-quantized tensors under the
fused names) keeps the fused names: expert e of `<experts>.<param>` is the linear `<experts>.<e>.<param>`, rows as the
model computes them (gpt-oss gate/up interleaved), (out, in) orientation; the record says `"names": "fused"`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..experts import ExpertsLayout, ExpertsLayoutError, QuantExperts, describe, fused_params
from ..runtime.fp8 import Fp8Linear
from ..runtime.int_experts import IntExperts
from ..runtime.int_linear import IntLinear
from ..spec import FP4_FORMATS, TensorSpec
from .format import FormatError, compress, weight_args
from .fp8 import fp8_codes, fp8_scheme
from .layers import compressed, load_compressed

__all__ = ["Entry", "CheckpointNames", "checkpoint_names", "experts_of", "compress_experts", "experts_target",
           "float_experts", "load_experts"]

# vLLM looks an experts layer's scheme up under `<its experts prefix>.0.gate_proj|up_proj|down_proj`, whatever the
# family's checkpoint names (CompressedTensorsMoEMethod.get_moe_method), so every experts target names these too.
VLLM_LEAVES = {"up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


@dataclass(frozen=True)
class Entry:
    """One expert's projection (or part of one) as the checkpoint holds it: module `name`, rows `rows` of expert
    `expert`'s (out, in) weight."""

    name: str
    expert: int
    rows: torch.Tensor


@dataclass
class CheckpointNames:
    """Model state keys -> checkpoint keys, and each experts module's entries per fused parameter."""

    layout: str  # "original" (the family's per-expert names) or "fused"
    keys: dict[str, str] = field(default_factory=dict)
    experts: dict[str, dict[str, list[Entry]]] = field(default_factory=dict)

    def key(self, k: str) -> str:
        return self.keys.get(k, k)

    def module(self, name: str) -> str:
        k = self.keys.get(f"{name}.weight")
        return k[: -len(".weight")] if k is not None and k.endswith(".weight") else name


def experts_of(model: nn.Module) -> dict[str, tuple[nn.Module, ExpertsLayout, dict[str, tuple[int, int]]]]:
    """{name: (module, layout, {param: (out, in)})} of every fused experts module distqat can describe."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, IntExperts):
            out[name] = (m, m.expert_layout, {p: m.out_in(p) for p in m.expert_layout.params})
            continue
        if isinstance(m, QuantExperts):
            lay = m.expert_layout
        elif fused_params(m):
            try:
                lay = describe(m, name)
            except ExpertsLayoutError:
                continue  # not an experts class distqat knows: its tensors are written as the model holds them
        else:
            continue
        shapes = {}
        for p in lay.params:
            w = getattr(m, p)
            shapes[p] = (w.shape[2], w.shape[1]) if lay.transposed else (w.shape[1], w.shape[2])
        out[name] = (m, lay, shapes)
    return out


def _fused_entries(name: str, lay: ExpertsLayout, shapes: dict[str, tuple[int, int]]) -> dict[str, list[Entry]]:
    return {p: [Entry(f"{name}.{e}.{p}", e, torch.arange(shapes[p][0])) for e in range(lay.num_experts)]
            for p in lay.params}


class _Unnamed(Exception):
    """transformers' reversal did something to the tracers that is not a per-expert split of rows."""


def checkpoint_names(model: nn.Module, fused_only: bool = False) -> CheckpointNames:
    """The names a converted folder writes `model`'s tensors under (see the module docstring); `fused_only`: the
    fused names whatever transformers maps (a folder written so says so in its record)."""
    from transformers.core_model_loading import revert_weight_conversion  # lazy: transformers loads on first use

    found = experts_of(model)
    fused = CheckpointNames("fused", experts={n: _fused_entries(n, lay, s) for n, (_, lay, s) in found.items()})
    if fused_only:
        return fused
    skip = {f"{n}.{p}{suffix}" for n, (_, lay, _) in found.items() for p in lay.params
            for suffix in ("", "_qweight", "_scale", "_zero")}
    state = {k: v for k, v in model.state_dict().items() if k not in skip}
    tracers: list[tuple[str, str, int, int, int, int]] = []  # (module, param, base, experts, out, size)
    base = 0
    for n, (_, lay, shapes) in found.items():
        for p in lay.params:
            rows = lay.num_experts * shapes[p][0]
            t = (torch.arange(rows * 2, dtype=torch.float64) + base).reshape(lay.num_experts, shapes[p][0], 2)
            state[f"{n}.{p}"] = t.transpose(1, 2) if lay.transposed else t
            tracers.append((n, p, base, lay.num_experts, shapes[p][0], rows * 2))
            base += rows * 2
    sources = {id(v): k for k, v in state.items()}
    out = revert_weight_conversion(model, dict(state))
    names = CheckpointNames("original")
    entries: dict[tuple[str, str], list[Entry]] = {}
    try:
        for new, t in out.items():
            src = sources.get(id(t))
            if src is not None and not any(src == f"{n}.{p}" for n, p, *_ in tracers):
                names.keys[src] = new
                continue
            n, p, e, rows = _decode(t, tracers)
            if not new.endswith(".weight") or t.dim() != 2:
                raise _Unnamed(new)
            entries.setdefault((n, p), []).append(Entry(new[: -len(".weight")], e, rows))
        for n, p, _, experts, rows_per, _ in tracers:
            got = entries.get((n, p), [])
            for e in range(experts):
                rows = torch.cat([x.rows for x in got if x.expert == e]) if got else torch.zeros(0)
                if not torch.equal(rows.sort().values, torch.arange(rows_per)):
                    raise _Unnamed(f"{n}.{p}")
            names.experts.setdefault(n, {})[p] = sorted(got, key=lambda x: (x.expert, x.name))
    except _Unnamed:
        return fused
    if set(names.keys) != set(state) - {f"{n}.{p}" for n, p, *_ in tracers}:
        return fused
    return names if names.experts or names.keys else fused


def _decode(t: torch.Tensor, tracers) -> tuple[str, str, int, torch.Tensor]:
    """(module, param, expert, rows) of a tracer piece in (out, in) orientation, else _Unnamed."""
    if t.dtype != torch.float64 or t.dim() != 2 or t.shape[1] != 2 or t.numel() == 0:
        raise _Unnamed("not a row piece")
    v0 = float(t[0, 0])
    for n, p, base, _, rows_per, size in tracers:
        if base <= v0 < base + size:
            rel = (t - base).long()
            row, col = rel // 2, rel % 2
            if not (bool((col[:, 0] == 0).all()) and bool((col[:, 1] == 1).all())
                    and torch.equal(row[:, 0], row[:, 1])):
                raise _Unnamed("not whole rows")
            g = row[:, 0]
            e = g // rows_per
            if not bool((e == e[0]).all()):
                raise _Unnamed("rows of several experts")
            return n, p, int(e[0]), g % rows_per
    raise _Unnamed("not a tracer")


def experts_target(entries: list[Entry], lay: ExpertsLayout, param: str) -> str:
    """The `re:` target of one experts module's projection `param`: its checkpoint names and vLLM's lookup names."""
    parts = [re.fullmatch(r"(.*)\.(\d+)\.([^.]+)", x.name) for x in entries]
    if any(m is None or int(m.group(2)) != x.expert for m, x in zip(parts, entries)) or \
            len({m.group(1) for m in parts}) != 1:
        raise FormatError(f"{entries[0].name}: expert names do not follow <experts>.<index>.<projection>; "
                          "distqat cannot target them in the config")
    leaves = sorted({m.group(3) for m in parts} | set(VLLM_LEAVES["up" if param == lay.up else "down"]))
    return f"re:^{re.escape(parts[0].group(1))}\\.\\d+\\.({'|'.join(leaves)})$"


def _quantized_specs(m: nn.Module, name: str) -> dict[str, tuple[TensorSpec, Optional[TensorSpec]]]:
    lay = m.expert_layout
    if isinstance(m, IntExperts):
        return dict(m.int_specs)
    specs = {p: (m.weight_quantizers[p].spec, m.input_quantizers[p].spec if p in m.input_quantizers else None)
             for p in lay.params if p in m.weight_quantizers}
    if specs and len(specs) != len(lay.params):
        left = [p for p in lay.params if p not in specs][0]
        raise FormatError(f"{name}.{left}: its other expert projection is quantized but this one is not; convert "
                          f"writes an experts layer quantized whole or not at all: quantize {name}.{left} too, or "
                          f"exclude {name} entirely")
    acts = [p for p in lay.params if p in m.input_quantizers and p not in specs]
    if acts:
        raise FormatError(f"{name}.{acts[0]}: activation-only quantized experts have no integer weights; quantize "
                          f"their weights too (e.g. w8a8) or exclude {name}")
    return specs


@torch.no_grad()
def compress_experts(m: nn.Module, name: str, entries: dict[str, list[Entry]]
                     ) -> list[tuple[str, str, dict[str, torch.Tensor], dict[str, Any], tuple]]:
    """[(param, checkpoint module, its compressed-tensors entries, its scheme, (weight spec, input spec) key)] of
    every expert projection of a QuantExperts or IntExperts `m`; [] when its weights are not quantized."""
    if not isinstance(m, (QuantExperts, IntExperts)):
        return []
    specs = _quantized_specs(m, name)
    out = []
    for p, (wspec, aspec) in specs.items():
        if isinstance(m, IntExperts):
            for x in entries[p]:
                comp, scheme = compressed(m.expert(p, x.expert, x.rows), x.name)
                out.append((p, x.name, comp, scheme, (repr(wspec), repr(aspec))))
            continue
        w = m.canonical(p).detach()
        dtype = w.dtype
        e, n, k = w.shape
        w2 = w.reshape(e * n, k)
        q = m.weight_quantizers[p]
        if aspec is not None and aspec.format == "int" and aspec.bits != 8:
            raise FormatError(f"{name}.{p}: int{aspec.bits} activations of experts have no runtime here (dense layers "
                              "do); quantize the experts' activations to 8 bits (quant.overrides, e.g. "
                              "{'*.experts.*': 'w4a8'}) or run the fake-quant folder")
        if wspec.format in FP4_FORMATS:
            raise FormatError(f"{name}.{p}: {wspec.format} experts have no converted layout in distqat yet (dense "
                              f"layers do); exclude the experts from fp4 (quant.overrides, e.g. "
                              f"{{'*.experts.*': 'w4g128'}}) or run the fake-quant folder")
        if wspec.format == "fp8":
            scheme = fp8_scheme(wspec, aspec, f"{name}.{p}")
            codes, scale = fp8_codes(w2, q, wspec)
            zero = None
        else:
            weight_args(wspec, f"{name}.{p}")
            codes, scale, zero = q.quantize(w2)
            if wspec.symmetric:
                codes = codes + (1 << (wspec.bits - 1))
        per_tensor = wspec.granularity == "tensor"
        for x in entries[p]:
            r = x.expert * n + x.rows
            s = scale if per_tensor else scale[r]
            if wspec.format == "fp8":
                comp = {"weight": codes[r].contiguous(), "weight_scale": s.contiguous()}
            else:
                z = None if zero is None else (zero if per_tensor else zero[r])
                comp, scheme = compress(codes[r], s, z, wspec, aspec, None, x.name, dtype)
            out.append((p, x.name, comp, scheme, (repr(wspec), repr(aspec))))
    return out


def float_experts(m: nn.Module, entries: dict[str, list[Entry]]) -> dict[str, torch.Tensor]:
    """The per-expert float weights of an experts module left full precision, under the family's original names."""
    return {f"{x.name}.weight": _canonical(m, p)[x.expert][x.rows].detach().contiguous()
            for p, xs in entries.items() for x in xs}


def _canonical(m: nn.Module, p: str) -> torch.Tensor:
    w = getattr(m, p)
    lay = getattr(m, "expert_layout", None)
    return w.transpose(1, 2) if (lay.transposed if lay is not None else getattr(m, "is_transposed", False)) else w


def load_experts(model: nn.Module, names: CheckpointNames, specs: dict[str, tuple[TensorSpec, Optional[TensorSpec]]],
                 tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[set[str], set[str]]:
    """Turn every experts module whose checkpoint entries `specs` quantizes into an IntExperts filled from
    `tensors` (float experts are filled as plain weights); (the checkpoint keys consumed, the model keys filled)."""
    used: set[str] = set()
    filled: set[str] = set()
    for name, (m, lay, shapes) in experts_of(model).items():
        entries = names.experts.get(name, {})
        per_param = {p: {repr(specs.get(x.name)): specs.get(x.name) for x in entries.get(p, [])} for p in lay.params}
        for p, got in per_param.items():
            if len(got) > 1:
                raise FormatError(f"{name}.{p}: its experts are written in several schemes ({len(got)}); distqat "
                                  "runs one scheme per experts projection: convert the model again")
        chosen = {p: next(iter(got.values())) for p, got in per_param.items() if got}
        if all(v is None for v in chosen.values()):
            if names.layout == "original":
                used |= _load_float(m, lay, entries, tensors)
                filled |= {f"{name}.{p}" for p in lay.params}
            continue
        if any(v is None for v in chosen.values()) or set(chosen) != set(lay.params):
            raise FormatError(f"{name}: some expert projections are quantized and others not; distqat writes "
                              "experts quantized whole: convert the model again")
        if any(w.format in FP4_FORMATS or (a is not None and a.bits != 8) for w, a in chosen.values()):
            raise FormatError(f"{name}: fp4 or 4-bit-activation experts have no runtime in this distqat; the folder "
                              "was not written by it: convert the fake-quant model again")
        IntExperts.wrap(m, lay, chosen, dtype)
        for p, (w, a) in chosen.items():
            k = shapes[p][1]
            for x in entries[p]:
                cls = Fp8Linear if w.format == "fp8" else IntLinear
                lin = cls(k, len(x.rows), w, a, bias=False, dtype=dtype)
                prefix = x.name + "."
                sub = {key[len(prefix):]: v for key, v in tensors.items() if key.startswith(prefix)}
                load_compressed(lin, sub, x.name)
                m.set_expert(p, x.expert, x.rows, lin)
                used |= {prefix + key for key in sub}
        filled |= {f"{name}.{p}_{b}" for p in lay.params for b in ("qweight", "scale", "zero")}
    return used, filled


@torch.no_grad()
def _load_float(m: nn.Module, lay: ExpertsLayout, entries: dict[str, list[Entry]],
                tensors: dict[str, torch.Tensor]) -> set[str]:
    used = set()
    for p in lay.params:
        w = _canonical(m, p)
        for x in entries.get(p, []):
            key = f"{x.name}.weight"
            if key not in tensors:
                raise FormatError(f"the checkpoint lacks {key}; it is incomplete or not written by distqat convert")
            w[x.expert, x.rows] = tensors[key].to(w.dtype)
            used.add(key)
    return used

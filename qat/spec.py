"""Quantization specs: what to quantize, to how many bits, on which grid.

A `QuantSpec` holds one `TensorSpec` per tensor kind (weight, activation, kv). The dataclasses are
also the OmegaConf schema of the `quant` config section, so a recipe and the code share one
definition. Short names ("w4a8kv8", "w4g64asym", "fp8") parse to specs and back.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from fnmatch import fnmatchcase
from typing import Any, Optional

from .options import setting

GRANULARITIES = ("tensor", "channel", "group", "token", "head")
FORMATS = ("int", "fp8", "nf4", "nvfp4", "mxfp4")
FP4_FORMATS = {"nvfp4": 16, "mxfp4": 32}  # e2m1 elements and their block size (qat/fp4.py)
SCALE_METHODS = ("minmax", "mse", "percentile")
LEARNABLE = ("none", "lsq", "lwc")
SYM_RANGES = ("signed", "full", "qmax")



class SpecError(ValueError):
    """An invalid quantization spec; the message says what is wrong and how to fix it."""


@dataclass
class TensorSpec:
    """How one kind of tensor is quantized.

    granularity: one scale per `tensor`, per output `channel` (weights), per `group` of
    `group_size` input columns (weights), per `token` (activations, kv), or per `head` and token (kv).
    learnable: `lsq` learns the step size (LSQ); `lwc` learns sigmoid-bounded clipping factors
    (OmniQuant); both are weight-only here, and `lsq` also works for static activation scales.
    dynamic: activations/kv compute their scale from each batch; False uses a calibrated scale.
    """

    bits: int = setting(8, range=(2, 8), help="bits per value (int: 2 to 8; fp8 and nf4 fix their own)")
    symmetric: bool = setting(True, help="a grid centred on zero (no zero point); false: asymmetric with a zero point")
    granularity: str = setting("channel", choices=GRANULARITIES,
                               help="one scale per tensor, output channel, group of input columns, token, or head")
    group_size: Optional[int] = setting(None, range=(2, 1 << 20),
                                        help="input columns sharing a scale (granularity=group only)")
    format: str = setting("int", choices=FORMATS, help="integer grid, fp8 (e4m3), nf4 (weights only), or fp4 (e2m1) "
                         "in blocks of 16 with e4m3 scales (nvfp4) or of 32 with power-of-two scales (mxfp4)")
    scale_method: str = setting("minmax", choices=SCALE_METHODS,
                                help="how a scale is chosen: the range, an MSE search, or a percentile")
    percentile: float = setting(99.9, range=(50.0, 100.0), help="the percentile scale_method=percentile takes")
    learnable: str = setting("none", choices=LEARNABLE,
                             help="lsq learns the step size; lwc learns clipping factors (weights); none: fixed")
    dynamic: bool = setting(True, help="activations/kv: a scale from each batch; false: a calibrated scale")
    sym_range: Optional[str] = setting(
        None, help="symmetric int grids: signed (weights) takes the smallest scale that clips neither end of a row, "
        "max(max / qmax, -min / -qmin) (absmax / 8 for a row whose absmax is negative, max / 7 otherwise at 4 bits: "
        "every code of [-2^(b-1), 2^(b-1)-1] usable, no rounding tie at either end); full maps a row's absmax to "
        "qmax + 1/2 (absmax / 7.5, as compressed-tensors, torchao and GPTQ's reference); qmax maps it to qmax "
        "(absmax / 7, the lowest code unused, LLM-QAT's grid); null: signed for weights, full for activations, qmax "
        "for the KV cache (quantized on the fly, where a tie would round differently in a cached and a full "
        "forward). Stored scales make every choice exact in the exported formats")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def q_range(self) -> float:
        """What a row's range is divided by to give its scale: qmax + 1/2 (full) or qmax for symmetric int grids,
        qmax - qmin for asymmetric ones. The signed grid has no single divisor (`range_qparams` takes the row's max
        over qmax and its min over qmin): asking it for one is a bug."""
        if not self.symmetric:
            return float(self.qmax - self.qmin)
        if self.sym_range == "signed":
            raise ValueError("sym_range=signed divides a row's max by qmax and its min by qmin: it has no q_range")
        return float(self.qmax) if self.sym_range == "qmax" else self.qmax + 0.5

    def signed_scale(self, lo: Any, hi: Any) -> Any:
        """The signed grid's scale for tensors of row minima and maxima: the smallest that puts neither hi above
        qmax nor lo below qmin, max(hi / qmax, lo / qmin), before any clamp or rounding to a scale dtype."""
        return (hi.clamp_min(0) / self.qmax).maximum(lo.clamp_max(0) / self.qmin)

    @property
    def clips(self) -> bool:
        """True when values can fall outside the quantization range (so the STE must mask them)."""
        return self.scale_method != "minmax" or self.learnable != "none" or not self.dynamic

    def check(self, kind: str) -> TensorSpec:
        """Raise SpecError for a combination that makes no sense for this tensor kind."""
        where = f"quant.{kind}"
        if self.sym_range is None:
            self.sym_range = default_sym_range(kind, self.format, self.symmetric)
        elif self.sym_range not in SYM_RANGES:
            raise SpecError(f"{where}.sym_range={self.sym_range!r} is not one of {list(SYM_RANGES)}")
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise SpecError(f"{where}.{f.name}={getattr(self, f.name)!r} is not one of {list(allowed)}")
        lo, hi = 2, 8
        if self.format == "int" and not lo <= self.bits <= hi:
            raise SpecError(f"{where}.bits={self.bits}: integer formats take {lo}..{hi} bits")
        if self.format == "fp8" and self.bits != 8:
            raise SpecError(f"{where}: format fp8 (e4m3) has 8 bits, got bits={self.bits}; set bits=8")
        if self.format == "nf4":
            if kind != "weight":
                raise SpecError(f"{where}.format=nf4 is a weight format; use int for {kind}")
            if self.bits != 4:
                raise SpecError(f"{where}: nf4 has 4 bits, got bits={self.bits}; set bits=4")
        if self.format in FP4_FORMATS:
            self._check_fp4(where, kind)
        if self.format != "int" and not self.symmetric:
            raise SpecError(f"{where}: format {self.format} is symmetric; set symmetric=true")
        if self.sym_range == "signed" and (kind != "weight" or self.format != "int" or not self.symmetric):
            # Activation and kv scales are computed on the fly by the runtime's kernels, from absmax alone.
            raise SpecError(f"{where}.sym_range=signed: only symmetric int weights take the signed grid; use "
                            f"sym_range={default_sym_range(kind, self.format, self.symmetric)}")
        if self.sym_range == "qmax" and (kind == "activation" or self.format != "int" or not self.symmetric):
            # The integer runtime quantizes activations on the full range only (its kernels take no divisor).
            raise SpecError(f"{where}.sym_range={self.sym_range}: only symmetric int weights and kv take the qmax "
                            "grid; leave sym_range=full")
        if (self.granularity == "group") != (self.group_size is not None):
            raise SpecError(
                f"{where}: group_size goes with granularity=group "
                f"(got granularity={self.granularity}, group_size={self.group_size})"
            )
        if self.group_size is not None and self.group_size < 2:
            raise SpecError(f"{where}.group_size={self.group_size}: must be >= 2")
        allowed_gran = {
            "weight": ("tensor", "channel", "group"),
            "activation": ("tensor", "token", "group") if self.format in FP4_FORMATS else ("tensor", "token"),
            "kv": ("tensor", "token", "head"),
        }[kind]
        if self.granularity not in allowed_gran:
            raise SpecError(
                f"{where}.granularity={self.granularity} is not possible for {kind} tensors; "
                f"use one of {list(allowed_gran)}"
            )
        if kind != "weight":
            if self.scale_method != "minmax":
                raise SpecError(f"{where}.scale_method={self.scale_method}: clipping search is for weights only")
            if self.learnable == "lwc":
                raise SpecError(f"{where}.learnable=lwc: learnable clipping is for weights only")
            if self.learnable == "lsq" and self.dynamic:
                raise SpecError(f"{where}.learnable=lsq needs a static scale; set dynamic=false")
            if not self.dynamic and not self.symmetric:
                raise SpecError(f"{where}: a static (calibrated) scale is symmetric (absmax); set symmetric=true")
            if not self.dynamic and self.granularity not in ("tensor",):
                raise SpecError(f"{where}: a static (calibrated) scale is per-tensor; set granularity=tensor")
            if kind == "kv" and self.dynamic and self.granularity == "tensor":
                # The cache is re-quantized as it grows; only per-token scales stay fixed per token.
                raise SpecError(f"{where}: a dynamic kv scale must be per token or per head; set granularity=token")
        elif not self.dynamic:
            raise SpecError(f"{where}.dynamic=false: weights have no dynamic/static choice; leave it true")
        return self

    def _check_fp4(self, where: str, kind: str) -> None:
        block = FP4_FORMATS[self.format]
        if kind == "kv":
            raise SpecError(f"{where}.format={self.format}: fp4 is for weights and activations; "
                            "use int for the kv cache")
        if self.bits != 4:
            raise SpecError(f"{where}: {self.format} has 4 bits (e2m1), got bits={self.bits}; set bits=4")
        if (self.granularity, self.group_size) != ("group", block):
            raise SpecError(f"{where}: {self.format} scales blocks of {block}; "
                            f"set granularity=group group_size={block}")
        if self.learnable == "lwc":
            raise SpecError(f"{where}.learnable=lwc: fp4 block scales learn as lsq; set learnable=lsq or none")
        if kind == "activation" and not self.dynamic:
            raise SpecError(f"{where}: {self.format} activations take dynamic block scales; set dynamic=true")

    def short(self, prefix: str) -> str:
        """This spec as a short-name component, e.g. 'w4g64asym'; SpecError if it has no short name."""
        kind = prefix_kind(prefix)
        default = default_spec(kind, self.bits, self.group_size, self.symmetric, self.format)
        # The grid (sym_range) is not part of a short name: a spec recorded on the qmax grid keeps its name.
        if replace(self, sym_range=default.sym_range) != default:
            raise SpecError(f"{asdict(self)} has no short name (only defaults of each short name do)")
        if self.format == "fp8":
            return f"{prefix}fp8"
        if self.format == "nf4":
            return f"{prefix}nf4" + (f"g{self.group_size}" if self.group_size else "")
        if self.format in FP4_FORMATS:
            return f"{prefix}{self.format}"
        s = f"{prefix}{self.bits}" + (f"g{self.group_size}" if self.group_size else "")
        if self.symmetric == default_symmetric(kind, self.format):
            return s
        return s + ("sym" if self.symmetric else "asym")


def default_sym_range(kind: str, fmt: str = "int", symmetric: bool = True) -> str:
    """The grid a symmetric int spec takes when it names none. Weights: signed, the tightest scale that clips
    nothing, which beat both absmax grids in every RTN the bundled model was scored at (w4 per channel, w4g64, w4g32,
    w3g64; docs/BENCHMARKS.md). Activations: the full signed range (the runtime's kernels compute it). The KV cache
    keeps qmax (it is quantized on the fly; a negative absmax on the full range sits on a rounding tie that one ulp
    of difference between a cached and a full forward, or the runtime and fake quant, rounds either way)."""
    if fmt != "int" or not symmetric:
        return "full"
    return {"weight": "signed", "kv": "qmax"}.get(kind, "full")


def prefix_kind(prefix: str) -> str:
    return {"w": "weight", "a": "activation", "kv": "kv"}[prefix]


def default_symmetric(kind: str, fmt: str = "int") -> bool:
    """Short names quantize activations asymmetrically (a zero point per token, as torchao's 8da4w QAT),
    weights and the KV cache symmetrically (LLM-QAT). On the bundled model, per-token int8 activations
    cost +3.2% perplexity symmetric against +1.4% asymmetric (docs/BENCHMARKS.md)."""
    return fmt != "int" or kind != "activation"


def default_spec(
    kind: str, bits: int, group: Optional[int], symmetric: Optional[bool] = None, fmt: str = "int"
) -> TensorSpec:
    """The spec a short-name component stands for: per-channel (or per-group) weights, per-token rest."""
    if fmt in FP4_FORMATS:
        return TensorSpec(bits=4, symmetric=True, granularity="group", group_size=FP4_FORMATS[fmt], format=fmt,
                          sym_range="full")
    gran = ("group" if group else "channel") if kind == "weight" else "token"
    if symmetric is None:
        symmetric = default_symmetric(kind, fmt)
    return TensorSpec(bits=bits, symmetric=symmetric, granularity=gran, group_size=group, format=fmt,
                      sym_range=default_sym_range(kind, fmt, symmetric))


@dataclass
class QuantSpec:
    """The quant config section: one spec per tensor kind, None meaning 'left in high precision'.

    In a config, `scheme: w4a8kv8` stands for the weight/activation/kv specs of that short name;
    keys given after it (in a later file or on the command line) adjust them.
    """

    scheme: Optional[str] = setting(None, help="a short name (w4a8kv8, w4g64, fp8 ...) standing for the "
                                    "weight/activation/kv keys; keys given after it adjust them")
    weight: Optional[TensorSpec] = setting(factory=lambda: TensorSpec(bits=4),
                                           help="how weights are quantized; null: left in high precision")
    activation: Optional[TensorSpec] = setting(None, help="how linears' inputs are quantized; null: not quantized")
    kv: Optional[TensorSpec] = setting(None, help="how the KV cache is quantized; null: not quantized")
    include: list[str] = setting(factory=lambda: ["*"], help="module-name patterns (fnmatch) of linears to quantize")
    exclude: list[str] = setting(factory=lambda: ["lm_head", "*.lm_head"],
                                 help="module-name patterns of linears left in high precision (the head by default)")
    overrides: dict[str, str] = setting(factory=dict, help="mixed precision: {pattern: short name}, e.g. "
                                        "{'*.down_proj': w8a8}; the first match wins; fused experts match as "
                                        "<module>.<parameter>, e.g. '*.experts.down_proj'")
    routers: bool = setting(False, help="quantize MoE routers (the linear that scores experts) too; by default "
                            "they stay full precision, like norms")

    def check(self) -> QuantSpec:
        if self.scheme is not None:
            parse(self.scheme)
        for kind in ("weight", "activation", "kv"):
            spec = getattr(self, kind)
            if spec is not None:
                spec.check(kind)
        for pattern, name in self.overrides.items():
            try:
                parse(name)
            except SpecError as e:
                raise SpecError(f"quant.overrides[{pattern!r}]: {e}") from None
        return self

    @property
    def name(self) -> str:
        """The short name ('w4a8kv8'); SpecError when some part has no short name."""
        if self.weight is None:
            raise SpecError("a spec without weight quantization has no short name")
        if (self.weight, self.activation, self.kv) == (
            default_spec("weight", 8, None, None, "fp8"), default_spec("activation", 8, None, None, "fp8"), None
        ):
            return "fp8"
        for fmt in FP4_FORMATS:
            if (self.weight, self.activation, self.kv) == (default_spec("weight", 4, None, None, fmt),
                                                           default_spec("activation", 4, None, None, fmt), None):
                return fmt
        out = self.weight.short("w")
        out += self.activation.short("a") if self.activation else ""
        out += self.kv.short("kv") if self.kv else ""
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        """A recorded spec. A record without `sym_range` predates it: its symmetric int weights and kv were trained
        on the qmax grid, so they keep it."""
        kw = dict(d)
        for kind in ("weight", "activation", "kv"):
            if kw.get(kind) is not None:
                kw[kind] = TensorSpec(**legacy_sym_range(kw[kind], kind))
        return cls(**kw).check()


def legacy_sym_range(d: dict[str, Any], kind: str) -> dict[str, Any]:
    """A TensorSpec record with the grid it was written with: symmetric int weights and kv recorded before
    `sym_range` existed used absmax / qmax (activations move to the full range: the runtime has no other)."""
    if "sym_range" in d:
        return d
    legacy = kind != "activation" and d.get("symmetric", True) and d.get("format", "int") == "int"
    return {**d, "sym_range": "qmax" if legacy else None}


_COMPONENT = r"(?:(\d+)|(fp8)|(nf4)|(nvfp4)|(mxfp4))(?:g(\d+))?(asym|sym)?"
_NAME = re.compile(rf"^w{_COMPONENT}(?:a{_COMPONENT})?(?:kv{_COMPONENT})?$")


def parse(name: str) -> QuantSpec:
    """Parse a short name: w<bits|fp8|nf4|nvfp4|mxfp4>[g<group>][sym|asym] [a<bits|nvfp4|mxfp4>[sym|asym]]
    [kv<bits>[sym|asym]], or fp8, nvfp4, mxfp4 (weights and activations in that format).

    16 bits means 'not quantized' (w4a16 = weight-only). Without a suffix, weights and kv are symmetric
    and activations asymmetric. Examples: w4a8kv8, w4g128, w4g64asym, w8a8, w8a8symkv8, w2g64, wnf4g64, fp8.
    """
    text = name.strip().lower()
    if text in FP4_FORMATS:
        return QuantSpec(weight=default_spec("weight", 4, None, None, text),
                         activation=default_spec("activation", 4, None, None, text)).check()
    if text == "fp8":
        return QuantSpec(
            weight=default_spec("weight", 8, None, None, "fp8"),
            activation=default_spec("activation", 8, None, None, "fp8"),
        ).check()
    m = _NAME.match(text)
    if not m:
        raise SpecError(
            f"cannot parse quant scheme {name!r}; expected e.g. w4a8kv8, w4g128, w4g64asym, w8a8, wnf4g64, fp8, "
            "nvfp4, mxfp4, w4a4kv4"
        )
    groups = m.groups()
    parts: dict[str, Optional[TensorSpec]] = {}
    for i, kind in enumerate(("weight", "activation", "kv")):
        bits, fp8, nf4, nvfp4, mxfp4, group, sym = groups[7 * i : 7 * i + 7]
        fp4 = nvfp4 or mxfp4
        if bits is None and fp8 is None and nf4 is None and fp4 is None:
            parts[kind] = None
            continue
        if bits is not None and int(bits) == 16:
            if group or sym:
                raise SpecError(f"{name!r}: a 16-bit (unquantized) {kind} takes no group or asym")
            parts[kind] = None
            continue
        if fp4:
            if group or sym:
                raise SpecError(f"{name!r}: {fp4} fixes its own blocks ({FP4_FORMATS[fp4]}) and is symmetric; "
                                "drop the g<size>/sym suffix")
            parts[kind] = default_spec(kind, 4, None, None, fp4)
            continue
        if group and kind != "weight":
            raise SpecError(f"{name!r}: groups apply to weights only")
        fmt = "fp8" if fp8 else "nf4" if nf4 else "int"
        nbits = 8 if fp8 else 4 if nf4 else int(bits)
        symmetric = None if sym is None else sym == "sym"
        parts[kind] = default_spec(kind, nbits, int(group) if group else None, symmetric, fmt)
    return QuantSpec(scheme=None, **parts).check()


def resolve_for_layer(spec: QuantSpec, module_name: str) -> QuantSpec:
    """The spec for one linear: the first matching override, else the spec itself."""
    for pattern, name in spec.overrides.items():
        if fnmatchcase(module_name, pattern):
            return replace(parse(name), include=spec.include, exclude=spec.exclude, overrides={}, routers=spec.routers)
    return spec


def check_layer(spec: Optional[TensorSpec], in_features: int, module_name: str,
                act: Optional[TensorSpec] = None) -> None:
    """Shape checks that need the layer: a group size (of the weight, or of fp4 input blocks) divides the width."""
    if act is not None and act.granularity == "group" and in_features % act.group_size:
        raise SpecError(f"quant.activation: {act.format} blocks of {act.group_size} do not divide in_features="
                        f"{in_features} of {module_name}; exclude the layer (quant.exclude) or use another format")
    if spec is not None and spec.granularity == "group" and in_features % spec.group_size:
        if spec.format in FP4_FORMATS:
            raise SpecError(f"quant.weight: {spec.format} blocks of {spec.group_size} do not divide in_features="
                            f"{in_features} of {module_name}; exclude the layer (quant.exclude) or use another format")
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise SpecError(
            f"quant.weight.group_size={spec.group_size} does not divide in_features={in_features} of {module_name}; "
            f"use one of {divisors or 'a divisor of ' + str(in_features)} or exclude the layer"
        )


__all__ = [
    "TensorSpec", "QuantSpec", "SpecError", "parse", "legacy_sym_range", "resolve_for_layer", "check_layer",
]

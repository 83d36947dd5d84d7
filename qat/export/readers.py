"""Which standard readers run a converted folder as written, and how; `convert` prints this and writes it into
the folder's README.md.

vLLM picks a kernel per layer from its config group and format, following the scheme matching of its
compressed-tensors integration (`CompressedTensorsConfig._get_scheme_from_parts`):
- a weight-only format (`pack-quantized`) runs as WNA16 when the weights are 4 or 8 bits, per channel or per
  group and static; any input-activation entry is dropped for such a format, which is why a8 layers must not
  be written packed. Asymmetric (zero-point) weights need a recent vLLM: older releases take symmetric only.
- an activation format (`int-quantized`) runs int8 activations per token (dynamic) with symmetric weights:
  8-bit per tensor or channel as W8A8Int8, 4-bit per channel or group as W4A8Int (vLLM's CPU kernels).
- the float activation format (`float-quantized`, fp8 e4m3) runs as W8A8Fp8 when weights and activations
  are float, the weights symmetric, static and per tensor or channel, the activations dynamic (W8A8Fp8
  quantizes them per token whatever strategy they declare) or static per tensor (`_is_fp8_w8a8`), on GPUs of
  compute capability 8.9+; below that vLLM falls back to W8A16Fp8 (fp8 weights, unquantized activations).
- a `kv_cache_scheme` must be 8-bit float, per tensor or head, symmetric. distqat's integer per-token KV
  cache has no such entry: it is written only in distqat_export, and other readers keep a full-precision cache.

Mixture-of-experts layers (`qat.export.experts`) run as vLLM's fused MoE methods, which are stricter
(`CompressedTensorsMoEMethod.get_moe_method`): vLLM looks the scheme up under `<experts>.0.gate_proj`, `.0.up_proj` and
`.0.down_proj` (so distqat's `re:` experts targets name those too) and refuses a layer whose three differ; then
`pack-quantized` 4- or 8-bit weights per channel or group, static, no activations, run as WNA16 MoE (Marlin; zero
points in recent vLLM; the group size must divide the hidden size and the per-GPU intermediate size); `int-quantized`
takes symmetric 8-bit weights per channel only (not per tensor) with dynamic per-token int8 activations (W8A8Int8 MoE),
or 4-bit ones per channel or group (W4A8Int8 MoE, vLLM's CPU path); `float-quantized` fp8 as for dense layers (W8A8Fp8
MoE). Routers are vLLM linears: they are listed in `ignore`.

transformers reads experts only through its conversion mapping (per-expert names merged into the stacked tensors,
`CompressedTensorsDequantize` decompressing each expert first): it takes the scheme of the first config group with an
`re:` target naming experts for every experts layer, decompresses `weight_packed` + `weight_scale` (no zero point) or
fp8 `weight` * `weight_scale`, and quantizes no expert activation. So symmetric packed experts load with the same
logits, fp8 ones load without their activation quantization, and int-quantized (a8) or asymmetric packed experts make
from_pretrained fail. A family with no mapping (gpt-oss) loads with its experts left at random initialisation.

transformers (compressed-tensors integration) decompresses every integer layout to dense weights and, for
the activation format, quantizes the inputs per token as distqat does. For packed asymmetric weights its
default path fails (compressed-tensors builds the empty model with an unpacked zero point, which the packed
one does not fit) and `CompressedTensorsConfig(dequantize=True)` loads them; that option also drops
activation quantization, so it is named only for weight-only folders. fp8 folders load on CPU too: the e4m3
weights are decompressed to dense and the inputs fake-quantized per token to e4m3 (in fp32 the logits equal
the fake-quant model's bit for bit, tested).

Online rotations (`ptq.rotate.online`, qat.online): a folder whose rotation record names R4 (a Hadamard on each
down_proj's input, its inverse folded into the weight) or R3 (a Hadamard on queries and keys after RoPE) computes its
model only when a reader applies them. distqat's reader does (qat.export.load_quantized reinstalls them from the
config's record, and its integer KV cache stores turned keys). No standard reader does: transformers has no
compressed-tensors transform support, and compressed-tensors' own `transform_config` (a `hadamard` TransformScheme
at location `input` of down_proj, or `q_attn`/`k_cache`) builds its non-power-of-two Hadamards from a table of known
matrices, not the Paley construction distqat folds (1536 = 12 x 128), so a description of ours would be a different
matrix than the weights hold. So distqat writes no `transform_config`: vLLM and transformers would load such a folder
and compute a different function without saying so (R4's weights expect the turned input; R3 alone is exact in full
precision, and changes only what a quantized cache rounds).

FP4 layers (`nvfp4-pack-quantized`, `mxfp4-pack-quantized`, see `fp4`), after vLLM's `_get_scheme_from_parts`
(`_is_fp4a16_nvfp4` / `_is_fp4a4_nvfp4`, later `_is_nvfp4_format`, and `_is_mxfp4`):
- NVFP4 is 4-bit float weights, symmetric, strategy tensor_group, group_size 16. Without input activations vLLM
  runs CompressedTensorsW4A16Fp4 (FP4 Marlin, weight-only, compute capability 8.0+). With NVFP4 input activations
  (the same four conditions) in an activation format (nvfp4-pack-quantized is one) it runs CompressedTensorsW4A4Fp4
  where cutlass FP4 runs (Blackwell, capability 10.0+) or with VLLM_USE_NVFP4_CT_EMULATIONS=1 (emulated in torch);
  elsewhere it warns and runs W4A16Fp4, the activations not quantized. Recent vLLM refuses NVFP4 weights with
  activations of another format. It keeps one weight and one input global scale per fused layer (q/k/v, gate/up:
  the largest of the shards'), which is why convert writes one weight global scale for such siblings (`fp4.
  share_globals`) and names the siblings it could not share one for (vLLM would scale those wrongly).
- MXFP4 is 4-bit float weights, symmetric, strategy group, group_size 32, e8m0 (uint8) scales. vLLM runs it as
  CompressedTensorsW4A16Mxfp4 (weight-only: the activation entry is ignored), recent releases as
  CompressedTensorsW4A4MxFp4 whatever the activations say, its kernel chosen per platform (MXFP4 activations only
  on GPUs with FP4 tensor cores).
- Activations. distqat's NVFP4 activations take a power-of-two global scale per token (`qat.fp4`); vLLM's (and
  compressed-tensors') take one static `input_global_scale`, written 1.0, so a block's scale is e4m3(amax / 6). Both
  round the block scale in e4m3 and the values in e2m1 the same way (nearest, ties to even), and scaling by a power of
  two commutes with e4m3 rounding in its normal range: a block is quantized identically when its scale is an e4m3
  normal both ways, i.e. amax in [6 x 2^-6, 6 x 448] = [0.09375, 2688] for vLLM and within about 2^14.8 of its
  token's largest block for distqat. Smaller blocks get a coarser (subnormal) scale in vLLM, larger ones saturate
  there (values clipped at 6 x 448); vLLM's kernels may also multiply by a reciprocal where distqat divides. Weights
  are exact in every reader. MXFP4 activations follow compressed-tensors' own e8m0 rule in distqat, so they agree.
  distqat's runtime (`qat.runtime.fp4.Fp4Linear`) reproduces the fake-quant model (the same quantizer, the same
  matmul: equal logits).
- transformers (CPU, compressed-tensors 0.20) decompresses both layouts to bf16 weights (e2m1 * scale / global;
  exact) and fake-quantizes the activations as the folder says: MXFP4 as distqat does (a bf16 folder gives the
  fake-quant logits bit for bit, tested), NVFP4 with the static global above. An fp32 model fails in its default
  path (bf16 weights meet fp32 inputs); `CompressedTensorsConfig(dequantize=True)` loads it (weights exact, the
  activations then not quantized).
- int4 activations (w4a4kv4: int4 weights per channel, asymmetric int4 per-token activations) are written
  `int-quantized`; vLLM has no scheme for them (its integer activation schemes take 8-bit activations; the newest
  WNA4Int takes symmetric int4 activations only), transformers fake-quantizes them per token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from safetensors import safe_open

from ..keys import EXPORT_KEY, HF_QUANT_KEY
from ..online import online_of
from .fp4 import FUSED
from .real_zero import REAL_ZERO_FORMAT, is_real_zero

DEQUANTIZE_HINT = ("AutoModelForCausalLM.from_pretrained(path, "
                   "quantization_config=CompressedTensorsConfig(dequantize=True))")


def vllm_scheme(group: dict[str, Any], fmt: str) -> tuple[Optional[str], str]:
    """(vLLM's scheme for one config group, why) or (None, why vLLM has none) for a layer written as `fmt`."""
    w, a = group["weights"], group.get("input_activations")
    bits, strategy, sym = w["num_bits"], w["strategy"], w["symmetric"]
    if fmt == "float-quantized":
        return vllm_fp8_scheme(w, a)
    if fmt in FP4_LAYOUT_NAMES:
        return vllm_fp4_scheme(w, a)
    if w.get("type", "int") != "int" or w.get("dynamic"):
        return None, "vLLM runs static integer weights only"
    if is_real_zero(w):
        return None, ("float zero points (a QA-LoRA merge): vLLM's integer kernels take integer zero points, and "
                      f"it matches no scheme to a weight-only {fmt} layer (WNA16 is pack-quantized only)")
    if fmt == "pack-quantized":
        if a is not None:
            return None, "vLLM drops the activation quantization of a weight-only (pack-quantized) layer"
        if strategy not in ("channel", "group"):
            return None, f"vLLM's WNA16 kernels take per-channel or per-group weights, not per-{strategy}"
        if bits not in (4, 8):
            return None, f"vLLM's WNA16 kernels take 4- or 8-bit weights, not {bits}-bit"
        return "WNA16", "" if sym else "asymmetric weights need a vLLM with zero-point WNA16 (older ones refuse)"
    if fmt != "int-quantized":
        return None, f"format {fmt!r} is not one distqat writes"
    if a is None or a["num_bits"] != 8 or a["strategy"] != "token" or not a.get("dynamic"):
        return None, "vLLM's integer activation kernels take dynamic per-token int8 activations (not int4)"
    if not sym:
        return None, "vLLM's integer activation kernels take symmetric weights only"
    if bits == 8 and strategy in ("tensor", "channel"):
        return "W8A8Int8", ""
    if bits == 4 and strategy in ("channel", "group"):
        return "W4A8Int", "vLLM runs W4A8Int on CPU (x86/Arm) only"
    return None, f"vLLM has no kernel for {bits}-bit per-{strategy} weights with int8 activations"


def vllm_fp8_scheme(w: dict[str, Any], a: Optional[dict[str, Any]]) -> tuple[Optional[str], str]:
    """vLLM's `_is_fp8_w8a8`: float weights and activations, symmetric static weights per tensor or channel,
    activations dynamic (any strategy; W8A8Fp8 quantizes them per token) or static per tensor."""
    if a is None or w.get("type") != "float" or a.get("type") != "float":
        return None, "vLLM's fp8 W8A8 scheme takes float weights and float activations"
    if not w["symmetric"] or w.get("dynamic") or w["strategy"] not in ("tensor", "channel"):
        return None, "vLLM's fp8 W8A8 scheme takes symmetric static weights per tensor or channel"
    if not a.get("dynamic") and not (a["symmetric"] and a["strategy"] == "tensor"):
        return None, "vLLM's fp8 W8A8 scheme takes dynamic or static per-tensor activations"
    why = "on GPUs of compute capability 8.9+; older ones run it as W8A16Fp8 (fp8 weights, activations not quantized)"
    if w["strategy"] == "tensor":  # CompressedTensorsW8A8Fp8.process_weights_after_loading: requantize_with_max_scale
        why += ("; per-tensor weights of fused layers (qkv, gate/up) are re-quantized to their largest scale, "
                "so they move by up to one e4m3 step")
    return "W8A8Fp8", why


FP4_LAYOUT_NAMES = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


def _is_nvfp4(args: Optional[dict[str, Any]]) -> bool:
    return bool(args) and args.get("type") == "float" and args["num_bits"] == 4 and \
        args["strategy"] == "tensor_group" and args.get("group_size") == 16 and args["symmetric"]


def _is_mxfp4(args: Optional[dict[str, Any]]) -> bool:
    return bool(args) and args.get("type") == "float" and args["num_bits"] == 4 and \
        args["strategy"] == "group" and args.get("group_size") == 32 and args["symmetric"]


def vllm_fp4_scheme(w: dict[str, Any], a: Optional[dict[str, Any]]) -> tuple[Optional[str], str]:
    """vLLM's FP4 schemes: NVFP4 weights alone (W4A16Fp4) or with NVFP4 activations (W4A4Fp4); MXFP4 weights."""
    if _is_nvfp4(w):
        if a is None:
            return "W4A16Fp4", "FP4 Marlin, compute capability 8.0+"
        if not _is_nvfp4(a):
            return None, "vLLM takes NVFP4 weights with NVFP4 activations or none"
        return "W4A4Fp4", ("FP4 tensor cores on capability 10.0+ (or VLLM_USE_NVFP4_CT_EMULATIONS=1); elsewhere vLLM "
                           "runs it as W4A16Fp4, activations not quantized; its activation block scales use a static "
                           "global 1.0 where distqat's use one per token (see qat.export.readers)")
    if _is_mxfp4(w):
        return ("W4A4MxFp4" if a is not None else "W4A16Mxfp4"), \
            "older vLLM runs MXFP4 weight-only (W4A16Mxfp4); MXFP4 activations need FP4 tensor cores"
    return None, "vLLM's FP4 schemes take NVFP4 (tensor_group 16) or MXFP4 (group 32) symmetric weights"


def is_experts_target(target: str) -> bool:
    """Whether a config target is one of distqat's experts targets (`re:^<experts>\\.\\d+\\.(<projections>)$`)."""
    return target.startswith("re:") and "experts" in target


def vllm_moe_scheme(group: dict[str, Any], fmt: str) -> tuple[Optional[str], str]:
    """(vLLM's fused-MoE method for one config group's experts, why) or (None, why vLLM has none)."""
    w, a = group["weights"], group.get("input_activations")
    if fmt == "float-quantized":
        s, why = vllm_fp8_scheme(w, a)
        return (f"{s}MoE", why) if s else (None, why)
    if w.get("type", "int") != "int" or w.get("dynamic"):
        return None, "vLLM runs static integer expert weights only"
    bits, strategy, sym = w["num_bits"], w["strategy"], w["symmetric"]
    if fmt == "pack-quantized":
        if a is not None or strategy not in ("channel", "group") or bits not in (4, 8):
            return None, "vLLM's WNA16 MoE takes 4- or 8-bit weights per channel or group without activations"
        why = ["zero points need a recent vLLM"] if not sym else []
        why += ["the group size must divide the per-GPU intermediate size"] if strategy == "group" else []
        return "WNA16MoE", "; ".join(why)
    if a is None or a["num_bits"] != 8 or a["strategy"] != "token" or not a.get("dynamic") or not sym:
        return None, "vLLM's integer MoE takes symmetric weights with dynamic per-token int8 activations"
    if bits == 8 and strategy == "channel":
        return "W8A8Int8MoE", ""
    if bits == 4 and strategy in ("channel", "group"):
        return "W4A8Int8MoE", "vLLM's CPU path only"
    return None, f"vLLM's integer MoE has no kernel for {bits}-bit per-{strategy} weights (int8: per channel only)"


def _experts_prefix(target: str) -> str:
    return re.sub(r"\\(.)", r"\1", target[len("re:^"):].split(r"\.\d+\.")[0])


def kv_words(kv: Optional[dict[str, Any]]) -> Optional[str]:
    """The KV record of distqat_export (a TensorSpec dict) in the words of the notes, e.g. 'int8 per token, dynamic'."""
    if kv is None:
        return None
    return f"int{kv['bits']} per {'token' if kv['granularity'] == 'token' else 'head and token'}, dynamic"


def _tensor_files(path: Path) -> dict[str, Path]:
    """{entry name: its safetensors file} of a folder, from the files' headers."""
    keys: dict[str, Path] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            keys.update({k: f for k in sf.keys()})
    return keys


def offset_layers(path: Path) -> int:
    """How many layers of a converted folder hold version 2's `weight_offset` (distqat's reader alone runs them)."""
    return sum(k.endswith(".weight_offset") for k in _tensor_files(path))


def folder_notes(path: Path) -> list[str]:
    """The notes of a converted folder computed from what it holds (config.json and its tensors' names), as convert
    writes them into its README.md: what a folder written by an older distqat (e.g. a version 2 merge) runs where."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    meta = cfg.get(EXPORT_KEY) or {}
    keys = _tensor_files(path)
    offsets = sum(k.endswith(".weight_offset") for k in keys)
    unshared = []
    for parent in sorted({k.rsplit(".", 2)[0] for k in keys if k.endswith(".weight_global_scale")}):
        for group in FUSED:
            names = [f"{parent}.{c}.weight_global_scale" for c in group]
            if all(n in keys for n in names):
                values = set()
                for n in names:
                    with safe_open(str(keys[n]), "pt") as sf:
                        values.add(float(sf.get_tensor(n).reshape(-1)[0]))
                if len(values) > 1:
                    unshared.append(f"{parent}.{{{','.join(group)}}}")
    return reader_notes(cfg[HF_QUANT_KEY], kv_words(meta.get("kv")), meta.get("experts"), unshared, offsets) + \
        rotation_notes(cfg)


def reader_notes(quant_config: dict[str, Any], kv: Optional[str], experts: Optional[dict[str, Any]] = None,
                 unshared: Optional[list[str]] = None, offsets: int = 0) -> list[str]:
    """One line per standard reader: what it runs of this folder (`kv`: distqat's KV cache, e.g. 'int8 per token';
    `experts`: distqat_export.experts of a MoE folder; `unshared`: NVFP4 siblings vLLM fuses whose weight global
    scales differ; `offsets`: how many layers hold version 2's `weight_offset`)."""
    fmt = quant_config["format"]
    groups = [(g, *vllm_scheme(g, g.get("format") or fmt)) for g in quant_config["config_groups"].values()]
    parts, runs, layers = [], True, {}
    for g, s, why in groups:
        dense = [t for t in g["targets"] if not is_experts_target(t)]
        moe = [t for t in g["targets"] if is_experts_target(t)]
        if dense:
            parts.append(f"{len(dense)} layers " + (f"as {s}" if s else "none") + (f" ({why})" if why else ""))
            runs = runs and s is not None
        if moe:
            ms, mwhy = vllm_moe_scheme(g, g.get("format") or fmt)
            parts.append(f"{len(moe)} expert projections " + (f"as {ms}" if ms else "none")
                         + (f" ({mwhy})" if mwhy else ""))
            runs = runs and ms is not None
            for t in moe:
                layers.setdefault(_experts_prefix(t), []).append(g)
    if layers and experts is not None and experts.get("names") != "original":
        runs = False
        parts.append(f"the experts are written under fused names ({experts.get('family')} has no per-expert "
                     "checkpoint names in transformers), which vLLM's loaders do not read")
    if unshared:
        runs = False
        parts.append(f"{unshared[0]} (and {len(unshared) - 1} more) keep different NVFP4 global scales (a block scale "
                     "would leave e4m3 under a shared one); vLLM fuses them under the largest and misreads the others")
    split = [n for n, gs in layers.items() if any(x is not gs[0] for x in gs)]
    if split:
        runs = False
        parts.append(f"{split[0]} mixes schemes across its expert projections, which vLLM refuses")
    if offsets:
        runs = False
        parts.append(f"{offsets} layers hold weight_offset (the real-valued part of their zero points, format version "
                     "2, a QA-LoRA merge), which no vLLM layer has a parameter for: its weight loader stops there")
    real = any(is_real_zero(g["weights"]) for g, _, _ in groups)
    packed_asym = any(not g["weights"]["symmetric"] and (g.get("format") or fmt) == "pack-quantized"
                      for g, _, _ in groups)
    has_act = any(g.get("input_activations") for g, _, _ in groups)
    fp8 = any((g.get("format") or fmt) == "float-quantized" for g, _, _ in groups)
    fp4 = any((g.get("format") or fmt) in FP4_LAYOUT_NAMES for g, _, _ in groups)
    act_words = "fp8 (e4m3)" if fp8 and all((g.get("format") or fmt) == "float-quantized" for g, _, _ in groups) \
        else "int8/fp8" if fp8 else "int8"
    lines = [f"vLLM: {'runs' if runs else 'cannot load'} it: " + "; ".join(parts)]
    if experts is not None:
        lines.append(_transformers_experts(quant_config, experts))
    who = "transformers (dense layers)" if experts is not None else "transformers"
    if offsets:
        lines.append(f"{who}: from_pretrained(path) fails on the packed asymmetric weights, and with {DEQUANTIZE_HINT} "
                     "it drops every weight_offset (reported UNEXPECTED), computing the base without the merged "
                     "adapter; to serve it, write it again with float zero points: distqat convert <path> --out <new>")
    elif packed_asym:
        lines.append(f"{who}: packed asymmetric weights load only with {DEQUANTIZE_HINT} (a compressed-"
                     "tensors bug breaks the default path); weights dense, the same logits")
    elif fp4:
        lines.append(f"{who}: AutoModelForCausalLM.from_pretrained(path) loads it in bf16, weights dense and exact"
                     + ("; it fake-quantizes the fp4 activations as the folder says (NVFP4 with a static global "
                        "scale 1.0 where distqat's is per token: see qat.export.readers)" if has_act else "")
                     + f"; in fp32 only with {DEQUANTIZE_HINT}, which drops activation quantization")
    else:
        lines.append(f"{who}: AutoModelForCausalLM.from_pretrained(path) loads it, weights dense"
                     + (f"; compressed-tensors quantizes the {act_words} activations per token as in training "
                        "(do not pass dequantize=True: it drops them)" if has_act else
                        f" ({REAL_ZERO_FORMAT} codes minus float zero points, times scales, in the model's dtype), the "
                        "same logits as distqat's within that dtype's rounding" if real else ", the same logits"))
    if kv:
        lines.append(f"KV cache: {kv} is distqat's own (qat.export.load_quantized); vLLM and transformers keep a "
                     "full-precision cache")
    kernels = "fp8 torch._scaled_mm on GPUs of compute capability 8.9+, an fp32 reference elsewhere" if fp8 \
        else "fp4 weights dequantized per matmul, the fake-quant input quantizer: the fake-quant logits" if fp4 \
        else "integer kernels" + (", real-valued zero points as a per-group offset term" if real or offsets else "")
    lines.append(f"distqat: qat.export.load_quantized(path) runs it as written ({kernels}, "
                 + ("integer KV cache" if kv else "no KV quantization") + ")")
    return lines


def rotation_notes(config: dict[str, Any]) -> list[str]:
    """The line a folder with online rotations adds to its readers' notes (none for a folder without)."""
    spec = online_of(config)
    if spec is None:
        return []
    what = " and ".join({"down": "R4 (a Hadamard on each down_proj input)", "qk": "R3 (a Hadamard on queries and keys "
                         "after RoPE)"}[o] for o in spec.ops)
    needs = "vLLM and transformers compute a different function" if "down" in spec.ops else \
        "vLLM and transformers run it with R3 left out, exact with their full-precision cache"
    return [f"online rotations: {what}; only distqat's reader applies them (qat.export.load_quantized, or qat.load."
            f"load); {needs}"]


def _transformers_experts(quant_config: dict[str, Any], experts: dict[str, Any]) -> str:
    if experts.get("names") != "original":
        return (f"transformers: it has no conversion mapping for {experts.get('family')} experts, so from_pretrained "
                "leaves them at random initialisation (reported MISSING): run the folder with distqat")
    groups = [g for g in quant_config["config_groups"].values() if any(map(is_experts_target, g["targets"]))]
    if not groups:
        return "transformers: the experts are full precision, merged as from any checkpoint of the family"
    g = groups[0]
    fmt = g.get("format") or quant_config["format"]
    mixed = any(x["weights"] != g["weights"] or x.get("format") != g.get("format") for x in groups)
    if mixed:
        return "transformers: it reads every experts layer in the first experts scheme; these differ: it misreads them"
    if fmt == "float-quantized":
        return ("transformers: the experts load dense (fp8 weights * scales), their activations not quantized: the "
                "logits differ from the trained model's by that")
    if fmt != "pack-quantized" or not g["weights"]["symmetric"]:
        return ("transformers: from_pretrained fails on these experts (its expert decompression reads packed symmetric "
                "or fp8 weights only); run the folder with distqat")
    return "transformers: the experts load dense from their packed codes, the same weights"


def model_card(name: str, spec_label: str, notes: list[str], version: int, weights: str = "integer") -> str:
    """The README.md of a converted folder (`weights`: "integer", "fp8" or "fp4")."""
    body = "\n".join(f"- {n}" for n in notes)
    return (f"# {name}: {spec_label}, {weights} weights\n\n"
            "Written by `distqat convert` in the compressed-tensors layout (config.json `quantization_config`); "
            f"distqat's own record (format version {version}, spec, checksums) is `distqat_export`.\n\n"
            f"## Who reads it\n\n{body}\n\n"
            "```python\nfrom qat.export import load_quantized\nmodel = load_quantized(path)\n```\n")

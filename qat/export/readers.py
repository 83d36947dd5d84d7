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

transformers (compressed-tensors integration) decompresses every integer layout to dense weights and, for
the activation format, quantizes the inputs per token as distqat does. For packed asymmetric weights its
default path fails (compressed-tensors builds the empty model with an unpacked zero point, which the packed
one does not fit) and `CompressedTensorsConfig(dequantize=True)` loads them; that option also drops
activation quantization, so it is named only for weight-only folders. fp8 folders load on CPU too: the e4m3
weights are decompressed to dense and the inputs fake-quantized per token to e4m3 (in fp32 the logits equal
the fake-quant model's bit for bit, tested).
"""

from __future__ import annotations

from typing import Any, Optional

DEQUANTIZE_HINT = ("AutoModelForCausalLM.from_pretrained(path, "
                   "quantization_config=CompressedTensorsConfig(dequantize=True))")


def vllm_scheme(group: dict[str, Any], fmt: str) -> tuple[Optional[str], str]:
    """(vLLM's scheme for one config group, why) or (None, why vLLM has none) for a layer written as `fmt`."""
    w, a = group["weights"], group.get("input_activations")
    bits, strategy, sym = w["num_bits"], w["strategy"], w["symmetric"]
    if fmt == "float-quantized":
        return vllm_fp8_scheme(w, a)
    if w.get("type", "int") != "int" or w.get("dynamic"):
        return None, "vLLM runs static integer weights only"
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
        return None, "vLLM's integer activation kernels take dynamic per-token int8 activations"
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


def reader_notes(quant_config: dict[str, Any], kv: Optional[str]) -> list[str]:
    """One line per standard reader: what it runs of this folder (`kv`: distqat's KV cache, e.g. 'int8 per token')."""
    fmt = quant_config["format"]
    groups = [(g, *vllm_scheme(g, g.get("format") or fmt)) for g in quant_config["config_groups"].values()]
    parts = [f"{len(g['targets'])} layers " + (f"as {s}" if s else "none") + (f" ({why})" if why else "")
             for g, s, why in groups]
    runs = all(s for _, s, _ in groups)
    packed_asym = any(not g["weights"]["symmetric"] and (g.get("format") or fmt) == "pack-quantized"
                      for g, _, _ in groups)
    has_act = any(g.get("input_activations") for g, _, _ in groups)
    fp8 = any((g.get("format") or fmt) == "float-quantized" for g, _, _ in groups)
    act_words = "fp8 (e4m3)" if fp8 and all((g.get("format") or fmt) == "float-quantized" for g, _, _ in groups) \
        else "int8/fp8" if fp8 else "int8"
    lines = [f"vLLM: {'runs' if runs else 'cannot load'} it: " + "; ".join(parts)]
    if packed_asym:
        lines.append(f"transformers: packed asymmetric weights load only with {DEQUANTIZE_HINT} (a compressed-"
                     "tensors bug breaks the default path); weights dense, the same logits")
    else:
        lines.append("transformers: AutoModelForCausalLM.from_pretrained(path) loads it, weights dense"
                     + (f"; compressed-tensors quantizes the {act_words} activations per token as in training "
                        "(do not pass dequantize=True: it drops them)" if has_act else ", the same logits"))
    if kv:
        lines.append(f"KV cache: {kv} is distqat's own (qat.export.load_quantized); vLLM and transformers keep a "
                     "full-precision cache")
    kernels = "fp8 torch._scaled_mm on GPUs of compute capability 8.9+, an fp32 reference elsewhere" if fp8 \
        else "integer kernels"
    lines.append(f"distqat: qat.export.load_quantized(path) runs it as written ({kernels}, "
                 + ("integer KV cache" if kv else "no KV quantization") + ")")
    return lines


def model_card(name: str, spec_label: str, notes: list[str], version: int, weights: str = "integer") -> str:
    """The README.md of a converted folder (`weights`: "integer" or "fp8")."""
    body = "\n".join(f"- {n}" for n in notes)
    return (f"# {name}: {spec_label}, {weights} weights\n\n"
            "Written by `distqat convert` in the compressed-tensors layout (config.json `quantization_config`); "
            f"distqat's own record (format version {version}, spec, checksums) is `distqat_export`.\n\n"
            f"## Who reads it\n\n{body}\n\n"
            "```python\nfrom qat.export import load_quantized\nmodel = load_quantized(path)\n```\n")

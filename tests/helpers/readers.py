"""A converted folder as the standard readers see it: compressed-tensors' decompressor, transformers'
from_pretrained, and vLLM's scheme matching restated from its source."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import transformers as tf
from safetensors.torch import load_file

from qat.linear import QuantLinear


def compressed_tensors_weights(folder) -> dict:
    """{linear name: its weight as compressed-tensors' own decompressor reads it from a converted folder}."""
    # Imported here: compressed-tensors is a dev extra, and the modules that call this skip without it.
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads((Path(folder) / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    tensors = load_file(str(Path(folder) / "model.safetensors"))
    out = {}
    for group in qc.config_groups.values():
        compressor = BaseCompressor.load_from_registry(group.format)
        for name in group.targets:
            local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            out[name] = compressor.decompress(local, scheme=group)["weight"]
    return out


def hf_and_fake_quant_logits(model, folder, ids) -> tuple:
    """(transformers' from_pretrained logits of a converted folder, the fake-quant model's, the fake-quant model's
    without activation quant): an a8 folder read right equals the second and not the third. Drops the model's
    input quantizers."""
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        got, ref = hf(ids).logits, model(ids).logits
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.input_quantizer = None
        return got, ref, model(ids).logits


# vLLM's rules, restated from its source (compressed_tensors.py, _get_scheme_from_parts and the
# predicates it calls), independently of qat.export.readers, to hold the written configs to.


def vllm_oracle(group: dict, top_format: str):
    """The compressed-tensors scheme vLLM runs a config group as; None where it has none."""
    fmt = group.get("format") or top_format
    w = group["weights"]
    # _quantization_scheme_map_from_config keeps input_activations only for activation formats
    act_format = fmt in ("naive-quantized", "int-quantized", "float-quantized")
    a = group.get("input_activations") if act_format else None
    static_w = not w["dynamic"]
    # _is_wNa16_group_channel (recent vLLM: any symmetry) + pack-quantized + WNA16_SUPPORTED_BITS
    if a is None and w["strategy"] in ("channel", "group") and static_w:
        if fmt == "pack-quantized" and w["num_bits"] in (4, 8):
            return "WNA16"
    if act_format and a is not None and w.get("type") == a.get("type") == "float":
        # _is_fp8_w8a8: symmetric static weights per tensor or channel; activations dynamic, or static per tensor
        if w["symmetric"] and static_w and w["strategy"] in ("tensor", "channel") and (
                a["dynamic"] or (a["symmetric"] and a["strategy"] == "tensor")):
            return "W8A8Fp8"  # on capability >= 8.9; below, CompressedTensorsW8A16Fp8
        return None
    if act_format and a is not None:
        token_dyn = a["strategy"] == "token" and a["dynamic"] and static_w
        # _is_dynamic_token_w8a8
        if w["num_bits"] == a["num_bits"] == 8 and w["strategy"] in ("tensor", "channel") and token_dyn \
                and w["symmetric"]:
            return "W8A8Int8"
        # _is_dynamic_token_w4a8_int
        if w["num_bits"] == 4 and a["num_bits"] == 8 and w["strategy"] in ("group", "channel") and token_dyn \
                and w["symmetric"]:
            return "W4A8Int"
    return None  # vLLM raises "No compressed-tensors compatible scheme was found."


def vllm_kv_ok(kv) -> bool:
    """Whether vLLM accepts a kv_cache_scheme."""
    # CompressedTensorsKVCacheMethod.validate_kv_cache_scheme
    return kv is None or (kv.get("type") == "float" and kv.get("num_bits") == 8
                          and kv.get("strategy") in ("tensor", "attn_head") and kv.get("symmetric"))


# vLLM's fused-MoE scheme choice, restated from its source (CompressedTensorsMoEMethod.get_moe_method,
# CompressedTensorsConfig.get_scheme_dict / _quantization_scheme_map_from_config, compressed_tensors/utils.py
# should_ignore_layer and find_matched_target, and the MoE methods' constructors), independently of
# qat.export.readers.


def _vllm_match(name: str, targets) -> bool:
    return any(t == name or (t.startswith("re:") and re.match(t[3:], name)) for t in targets)


def vllm_moe_oracle(quant_config: dict, experts_prefix: str):
    """The fused-MoE method vLLM runs the experts layer `experts_prefix` (vLLM's module name) with: a method name,
    "Unquantized" when ignored, or None where vLLM raises."""
    scheme_map = {}
    for g in quant_config["config_groups"].values():
        for t in g["targets"]:
            scheme_map[t] = g
    if "Linear" in scheme_map:  # _add_fused_moe_to_target_scheme_map
        scheme_map.setdefault("FusedMoE", scheme_map["Linear"])
    looked = []
    for proj in ("gate_proj", "up_proj", "down_proj"):  # get_moe_method: expert 0's unfused names
        name = f"{experts_prefix}.0.{proj}"
        if _vllm_match(name, quant_config.get("ignore") or []):
            looked.append("ignored")
            continue
        hit = next((t for t in scheme_map if _vllm_match(name, [t])), None) or \
            next((t for t in scheme_map if not t.startswith("re:") and t.lower() in "fusedmoe"), None)
        if hit is None:
            return None  # find_matched_target: no target
        looked.append(id(scheme_map[hit]))
    if len(set(looked)) != 1:
        return None  # "All MoE projections need to have same quantization scheme"
    if looked[0] == "ignored":
        return "Unquantized"
    g = next(x for x in scheme_map.values() if id(x) == looked[0])
    fmt = g.get("format") or quant_config["format"]
    w = g["weights"]
    act_format = fmt in ("naive-quantized", "int-quantized", "float-quantized")
    a = g.get("input_activations") if (act_format or g.get("input_activations")) else None
    static = not w.get("dynamic")
    if a is None and w["strategy"] in ("channel", "group") and static:  # _is_wNa16_group_channel
        return "WNA16MoE" if fmt == "pack-quantized" and w["num_bits"] in (4, 8) else None
    if a is None:
        return None
    if w.get("type") == a.get("type") == "float":
        ok = w["symmetric"] and static and w["strategy"] in ("tensor", "channel", "block") and (
            a["dynamic"] or (a["symmetric"] and a["strategy"] == "tensor"))
        return "W8A8Fp8MoE" if ok else None
    token = a["strategy"] == "token" and a["dynamic"] and static and w["symmetric"]
    if w["num_bits"] == a["num_bits"] == 8 and w["strategy"] in ("tensor", "channel") and token:
        # CompressedTensorsW8A8Int8MoEMethod: "we require channelwise, dynamic per token quantization"
        return "W8A8Int8MoE" if w["strategy"] == "channel" else None
    if w["num_bits"] == 4 and a["num_bits"] == 8 and w["strategy"] in ("group", "channel") and token:
        return "W4A8Int8MoE"
    return None  # "Unsupported FusedMoe scheme"


# The parameters vLLM's compressed-tensors schemes create for a layer (create_weights of each scheme class), restated
# from its source: a checkpoint entry of a layer that names none of them has no parameter to load into, and vLLM's
# weight loading stops there (AutoWeightsLoader: "There is no module or parameter named ...", or a KeyError in the
# models that look their parameters up by name).
VLLM_PARAMS = {
    "WNA16": {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "bias"},
    "W8A8Int8": {"weight", "weight_scale", "input_scale", "input_zero_point", "bias"},
    "W4A8Int": {"weight", "weight_scale", "weight_zero_point", "bias"},
}


def vllm_loads(folder) -> bool:
    """Whether vLLM would load a converted folder of dense layers: every config group has a scheme
    (`vllm_oracle`) and every entry of its layers is a parameter that scheme creates."""
    from safetensors import safe_open

    config = json.loads((Path(folder) / "config.json").read_text())
    q = config["quantization_config"]
    keys = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    for group in q["config_groups"].values():
        scheme = vllm_oracle(group, q["format"])
        if scheme is None:
            return False
        for t in group["targets"]:
            own = {k[len(t) + 1:] for k in keys if k.startswith(t + ".")}
            if not own <= VLLM_PARAMS.get(scheme, own):
                return False
    return True

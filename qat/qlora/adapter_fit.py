"""Whether an adapter fits a base, before anything loads: an adapter folder written elsewhere (peft alone, e.g. with
bitsandbytes on the unquantized model) against the packed base's layers, and a training checkpoint's adapter layout
against the one a resumed run builds.

peft matches an adapter to a model by module names and loads with its own size checks, whose errors name tensors
and shapes in a long torch message; a missing target is a warning at most. Here every adapted layer is checked by
name, input width and output width, and the first one that does not fit stops the load in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from safetensors import safe_open
from torch import nn

from ..runtime.packed import PackedLinear
from ..runtime.packed_experts import PackedExpertStack

ADAPTER_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's saved keys start with it (PeftModel -> LoraModel -> the model)


def adapter_shapes(path: Union[str, Path]) -> dict[str, tuple[int, ...]]:
    """The saved tensors' shapes of the peft adapter folder `path`, read from the safetensors header only."""
    folder = Path(path)
    file = folder / ADAPTER_FILE
    if not file.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ValueError(f"{folder} holds its adapter as adapter_model.bin, a pickle distqat does not load; "
                             "save it again with peft's save_pretrained (safetensors, the default)")
        raise FileNotFoundError(f"{folder} holds no {ADAPTER_FILE}: not a peft adapter folder")
    with safe_open(str(file), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_fits(model: nn.Module, path: Union[str, Path], config: Any) -> None:
    """ValueError in one line unless every layer the adapter of `path` (peft LoraConfig `config`) adapts is a layer
    of `model` with the adapter's input and output widths."""
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"{path} is a {config.peft_type} adapter; distqat loads LoRA adapters only")
    if getattr(config, "use_dora", False):
        raise ValueError(f"{path} is a DoRA adapter: DoRA rescales the base's fp weight, which a packed base holds as "
                         "codes; merge it into the full-precision model first (peft merge_and_unload), then quantize")
    if getattr(config, "target_parameters", None):
        raise ValueError(f"{path} adapts parameters ({sorted(config.target_parameters)[:2]}...), not modules: a "
                         "packed base holds expert weights as codes; train the adapter on distqat's packed base")
    group = config.qalora_group_size if getattr(config, "use_qalora", False) else 1
    modules = dict(model.named_modules())
    for key, shape in sorted(adapter_shapes(path).items()):
        parts = key.removeprefix(PREFIX).split(".")
        if "lora_A" not in parts and "lora_B" not in parts:
            continue  # modules_to_save and the like: peft loads them into the model's own modules
        which = "lora_A" if "lora_A" in parts else "lora_B"
        name = ".".join(parts[: parts.index(which)])
        layer = modules.get(name)
        if layer is None:
            raise ValueError(f"{path} adapts {name}, which this base does not have: the adapter was trained on "
                             "another model; load it onto the base it was trained on")
        layer = getattr(layer, "base_layer", layer)
        widths = _widths(layer)
        if widths is None:
            continue  # embeddings, convolutions: peft's own layers, with its own checks
        n_in, n_out = widths
        width, want, side = (shape[-1], n_in // group, "inputs") if which == "lora_A" else \
            (shape[-2], n_out, "outputs")
        if len(shape) < 2 or width != want:
            raise ValueError(f"{path}: {name}.{which} is {tuple(shape)}, but this base's {name} has {want} "
                             f"{side}{' (after QA-LoRA pooling)' if group > 1 and which == 'lora_A' else ''}: the "
                             "adapter was trained on another model; load it onto the base it was trained on")


def _widths(layer: nn.Module) -> Optional[tuple[int, int]]:
    """(inputs, outputs) of one adapted matrix (an expert's, for a packed experts stack)."""
    if isinstance(layer, PackedExpertStack):
        return layer.in_features, layer.expert_out
    if isinstance(layer, (PackedLinear, nn.Linear)):
        return layer.in_features, layer.out_features
    return None


def adapter_layout(peft_model: nn.Module) -> dict[str, Any]:
    """What a resume must find unchanged: the adapted layers, the rank, alpha and the variant."""
    config = peft_model.peft_config[peft_model.active_adapter]
    targets = config.target_modules
    return {"target_modules": sorted(targets) if not isinstance(targets, str) else targets, "r": config.r,
            "alpha": config.lora_alpha, "variant": "qalora" if getattr(config, "use_qalora", False) else "lora"}


def layout_change(saved: Optional[dict[str, Any]], now: dict[str, Any]) -> Optional[str]:
    """The first difference between a checkpoint's adapter layout and this run's, as a phrase; None when they
    agree (or the checkpoint predates the record)."""
    if saved is None:
        return None
    for key, setting in (("r", "lora.r"), ("variant", "lora.variant"), ("alpha", "lora.alpha")):
        if saved.get(key) != now[key]:
            return f"{setting} was {saved.get(key)} there and is {now[key]} now"
    old, new = saved.get("target_modules"), now["target_modules"]
    if old != new:
        if isinstance(old, list) and isinstance(new, list):
            gone, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
            ex = (f"{len(added)} new, e.g. {added[0]}" if added else "") + ("; " if added and gone else "") + \
                (f"{len(gone)} dropped, e.g. {gone[0]}" if gone else "")
            return f"lora.target_modules adapted {len(old)} layers there and {len(new)} now ({ex})"
        return f"lora.target_modules was {old} there and is {new} now"
    return None

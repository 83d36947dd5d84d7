"""A base with an adapter on it, un-merged, for the commands that run a model (`eval`, `generate`:
`lora.adapter=<folder>`).

The base is any folder a QLoRA run trains on (`qat.qlora.base.build_base`): a base model quantized at load, a
QAT/PTQ folder, or an integer checkpoint (`distqat convert`, a `lora.merge=qalora` output), held packed; the
adapter's LoRA layers compute beside the packed layers exactly as in training. An adapter distqat wrote must
match the base's fingerprint; one written elsewhere must fit the base's layers (`load_adapters`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..io.folders import Folder, Kind, inspect, spec_label
from ..spec import QuantSpec
from .adapters import find_record, load_adapters
from .base import build_base, fingerprint


def adapter_spec(folder: Folder, adapter: Union[str, Path], spec: Optional[QuantSpec]) -> Optional[QuantSpec]:
    """The spec a base model is quantized with at load: the one the adapter was trained on (its distqat record),
    else `spec`; a quantized folder brings its own."""
    record = find_record(adapter)
    if folder.kind is Kind.BASE and record is not None and record.get("spec"):
        return QuantSpec.from_dict(record["spec"])
    return spec


def base_label(folder: Folder, spec: Optional[QuantSpec]) -> str:
    """How results name the packed base: its folder's label, or the spec it is quantized with at load."""
    return spec_label(spec) if folder.kind is Kind.BASE else folder.label


def check_adapter(adapter: Union[str, Path]) -> None:
    """FileNotFoundError in one line, before any model loads, unless `adapter` is a peft adapter folder."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"lora.adapter={adapter} holds no adapter_config.json: give the adapters folder of "
                                "a QLoRA run (<output_dir>/adapters) or a peft adapter folder")


def with_adapter(
    name_or_path: Union[str, Path, Folder], adapter: Union[str, Path], spec: Optional[QuantSpec] = None,
    dtype: Union[str, torch.dtype] = "auto", attn_implementation: Optional[str] = "sdpa",
    trust_remote_code: bool = False, attach: bool = True,
) -> nn.Module:
    """The packed base of `name_or_path` (a base model quantized at load with the adapter's spec, else `spec`)
    with the adapter of `adapter` on it (with `attach` false, the same packed base alone), in eval mode. Returned
    is the transformers model itself, peft's LoRA layers in place of the adapted layers: `generate`, lm-eval and
    the perplexity loop use it as any other model."""
    check_adapter(adapter)
    folder = name_or_path if isinstance(name_or_path, Folder) else inspect(name_or_path)
    record = find_record(adapter)
    spec = adapter_spec(folder, adapter, spec)
    if folder.kind is Kind.BASE and (spec is None or spec.weight is None):
        raise ValueError(f"{adapter} carries no distqat record, so nothing says how to quantize {folder.name}: "
                         "give a quantized base (a ptq, train or convert output), or quant.scheme where the command "
                         "takes it (eval)")
    double_quant = bool(record.get("double_quant", True)) if record else True
    base, _ = build_base(folder, spec, dtype, attn_implementation, trust_remote_code, double_quant)
    if not attach:
        return base
    if record is not None and record.get("fingerprint") != fingerprint(base):
        raise ValueError(f"the adapters in {adapter} were trained on another base than {folder.name} as loaded "
                         f"here ({record.get('base')}, a different fingerprint); load them onto the base they were "
                         "trained on, with the model.dtype of their training run (the base's scales are held in it)")
    peft_model = load_adapters(base, adapter)
    return peft_model.get_base_model().eval()

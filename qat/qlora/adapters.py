"""LoRA adapters on the packed base through peft: `get_peft_model`, `save_pretrained`, `PeftModel.from_pretrained`.

peft does not know `PackedLinear`; `PackedLoraLinear`, a subclass of peft's `lora.Linear`, is its LoRA layer.
Importing this module registers it with peft for every LoRA model (`register_with_peft`: peft's own per-config
mapping, `LoraConfig._register_custom_module`, is not saved with an adapter), so plain peft loads an adapter onto a
packed base once distqat's adapters are imported:

    import qat.qlora.adapters  # noqa: F401  (registers the packed layers with peft)
    model = PeftModel.from_pretrained(build_base(folder, None)[0], adapter_folder)

Any other model's layers go to peft's own dispatch, as before.
The QA-LoRA variant is peft's own (`use_qalora`): the adapter sees each weight group's input pooled.
A packed experts stack (`PackedExpertStack`, one projection of every expert) gets per-expert adapters from
`qat.qlora.expert_adapters.PackedLoraExperts`, registered the same way; targets name it as `<experts>.<param>`
(`*.experts.gate_up_proj`, `*.experts.down_proj`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraModel
from peft.tuners.lora.variants import QALoraLinearVariant
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..io.atomic import atomic_dir, write_json
from ..keys import QLORA_RECORD_FILE
from ..runtime.packed import PackedLinear
from .adapter_fit import check_fits
from .config import LoRAConfig
from .expert_adapters import CUSTOM_MODULES as EXPERT_MODULES

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PackedLoraLinear(LoraLinear):
    """peft's LoRA layer on a PackedLinear base; merging goes through qat.qlora.merge, not peft."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any):
        if config.use_qalora:
            return QALoraLinearVariant()
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(f"the LoRA variant {type(variant).__name__} needs the base's fp weight; a packed base "
                             "takes lora.variant=lora or qalora")
        return None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError("a packed base merges through distqat (lora.merge=qalora, requant or bf16: "
                                  "qat.qlora.merge), not peft's merge")

    def unmerge(self) -> None:
        raise NotImplementedError("a packed base is never merged in place, so there is nothing to unmerge")

    def _ab(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B in fp32 (fp64 for fp64 adapters)."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        wide = torch.float64 if a.dtype == torch.float64 else torch.float32
        return a.to(wide), b.to(wide)

    def group_delta(self, adapter: str) -> torch.Tensor:
        """QA-LoRA: the adapter's weight as one value per (output row, input group), (N, G), in fp32."""
        a, b = self._ab(adapter)
        pooled = a.shape[1]  # peft scales the pooled (mean) input by the number of groups
        return (b @ a) * (self.scaling[adapter] * pooled / self.qalora_group_size[adapter])

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's weight (N, K) in fp32, for either variant."""
        if adapter in self.lora_variant:
            return self.group_delta(adapter).repeat_interleave(self.qalora_group_size[adapter], dim=1)
        a, b = self._ab(adapter)
        return (b @ a) * self.scaling[adapter]


# Checked in order, by isinstance: an experts stack is a PackedLinear over its stacked rows, so it comes first.
CUSTOM_MODULES: dict[type, type] = {**EXPERT_MODULES, PackedLinear: PackedLoraLinear}


def packed_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """The names of the packed linears and expert stacks that match `patterns` (all of them when it is empty)."""
    names = [n for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    chosen = [n for n in names if not patterns or any(fnmatchcase(n, p) or n.endswith("." + p) for p in patterns)]
    if not chosen:
        raise ValueError(f"lora.target_modules={patterns} matches none of the packed linears (e.g. {names[:3]}); "
                         "give name patterns such as '*.q_proj' or leave it empty for all")
    return chosen


def peft_config(model: nn.Module, cfg: LoRAConfig) -> LoraConfig:
    targets = packed_targets(model, cfg.target_modules)
    qalora = cfg.variant == "qalora"
    group = None
    if qalora:
        layers = [model.get_submodule(n) for n in targets]
        bad = [n for n, m in zip(targets, layers) if m.nf4 or m.weight_spec.granularity != "group"]
        if bad:
            raise ValueError(f"lora.variant=qalora pools the input by weight group: {bad[0]} is not an integer "
                             "per-group layer; quantize with groups (e.g. quant.scheme=w4g32) or use lora.variant=lora")
        sizes = {m.group_size for m in layers}
        if len(sizes) > 1:
            raise ValueError(f"lora.variant=qalora needs one group size over the targets, found {sorted(sizes)}")
        group = sizes.pop()
        fewest = min(m.in_features // group for m in layers)
        if cfg.r > fewest:
            raise ValueError(f"lora.r={cfg.r} is above the {fewest} groups of the narrowest target: QA-LoRA's "
                             f"adapter sees one pooled input per group; set lora.r <= {fewest}")
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM", use_qalora=qalora,
                        **({"qalora_group_size": group} if qalora else {}))
    return config


def add_adapters(model: nn.Module, cfg: LoRAConfig) -> PeftModel:
    """Trainable adapters (in `cfg.dtype`) on the packed base; the base stays frozen."""
    peft_model = get_peft_model(model, peft_config(model, cfg))
    dtype = TORCH_DTYPES[cfg.dtype]
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
    return peft_model


def save_adapters(peft_model: PeftModel, out: Union[str, Path], record: dict[str, Any], tokenizer: Any = None) -> Path:
    """peft's adapter files, `record` (the base's name, spec and fingerprint) and the tokenizer beside them, as one
    folder that replaces an earlier one whole: a full disk or a kill midway leaves the earlier folder as it was."""
    out = Path(out)
    need = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)
    with atomic_dir(out, need=need) as tmp:
        peft_model.save_pretrained(str(tmp))
        write_json(tmp / QLORA_RECORD_FILE, record)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def read_record(path: Union[str, Path]) -> dict[str, Any]:
    file = Path(path) / QLORA_RECORD_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} holds no {QLORA_RECORD_FILE}: not an adapter folder written by distqat train "
                                "with train.mode=qlora")
    return json.loads(file.read_text())


def find_record(path: Union[str, Path]) -> Optional[dict[str, Any]]:
    """The distqat record of an adapter folder; None for one written elsewhere (peft alone)."""
    return read_record(path) if (Path(path) / QLORA_RECORD_FILE).is_file() else None


def load_adapters(model: nn.Module, path: Union[str, Path], fingerprint: Optional[str] = None,
                  trainable: bool = False) -> PeftModel:
    """The adapters of `path` on the packed `model`. A folder distqat wrote carries the base's fingerprint: with
    `fingerprint`, one trained on another base is refused. A folder written elsewhere (peft alone, on the same
    model unquantized or under bitsandbytes) has none; every layer it adapts must then exist in `model` with the
    adapter's widths, or it is refused in one line naming the first that does not fit."""
    path = Path(path)
    record = find_record(path)
    if fingerprint is not None and record is not None and record.get("fingerprint") != fingerprint:
        raise ValueError(f"the adapters in {path} were trained on another base ({record.get('base')}, a different "
                         "fingerprint); load them onto the base they were trained on")
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} holds no adapter_config.json: not a peft adapter folder")
    config = LoraConfig.from_pretrained(str(path))
    check_fits(model, path, config)
    return PeftModel.from_pretrained(model, str(path), config=config, is_trainable=trainable)


def _dispatch(original: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """peft's LoRA layer factory, sending packed layers to distqat's LoRA layers and everything else to `original`
    (a mapping the config registers itself still wins: peft checks it first)."""

    def create_new_module(lora_config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        own = getattr(lora_config, "_custom_modules", None) or {}
        if not any(isinstance(base, key) for key in own):
            for key, custom in CUSTOM_MODULES.items():
                if isinstance(base, key):
                    return custom(target, adapter_name, config=lora_config, **kwargs)
        return original(lora_config, adapter_name, target, **kwargs)

    create_new_module.wrapped_by_qat = original  # type: ignore[attr-defined]
    return create_new_module


def _not_for_packed(convert: Callable[..., Any], keep: Callable[..., Any]) -> Callable[..., Any]:
    """`convert`, one of peft's transformers-5 rewrites of MoE adapters, skipped (`keep`) for a model that holds a
    packed layer.

    Under transformers 5, peft rewrites the targets of about 30 MoE model types (Qwen3-MoE, OLMoE, DeepSeek-V3,
    Mixtral...) from their transformers 4 per-expert linears to the fused 3-D parameters: a target ending in
    `down_proj`, `gate_proj`, `up_proj`, `gate` (or `w1`-`w3`) becomes a `target_parameters` entry, and
    `gate_up_proj` gets twice the rank. distqat's targets are the module names of the packed model as it is (expert
    stacks, shared experts, dense layers), so that rewrite would silently leave them without adapters.
    """

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        model = kwargs.get("model")
        if model is not None and any(isinstance(m, PackedLinear) for m in model.modules()):
            return keep(*args, **kwargs)
        return convert(*args, **kwargs)

    wrapper.wrapped_by_qat = convert  # type: ignore[attr-defined]
    return wrapper


def register_with_peft() -> None:
    """Make plain peft (`get_peft_model`, `PeftModel.from_pretrained`) put distqat's LoRA layers on packed layers;
    runs once, on import of this module."""
    if hasattr(LoraModel._create_new_module, "wrapped_by_qat"):
        return
    LoraModel._create_new_module = staticmethod(_dispatch(LoraModel._create_new_module))
    try:
        # lazy: the module exists in peft >= 0.19 only (transformers 5's MoE layouts), and is optional here
        from peft.utils import transformers_weight_conversion as v5
    except ImportError:
        return
    v5.convert_peft_config_for_transformers = _not_for_packed(v5.convert_peft_config_for_transformers,
                                                              lambda *a, **k: None)
    v5.convert_peft_adapter_state_dict_for_transformers = _not_for_packed(
        v5.convert_peft_adapter_state_dict_for_transformers, lambda *a, **k: k["adapter_state_dict"])


register_with_peft()

"""Per-expert LoRA on a packed experts stack, as peft's custom module for `PackedExpertStack`.

Each expert e of a stacked projection gets its own A_e (r, in) and B_e (out, r), held as two 3-D parameters
(`lora_A` (E, r, in), `lora_B` (E, out, r)); the adapter adds B_e A_e x * scaling to the rows of expert e, in
activation space, so lora.dropout applies to its input as on the dense layers. An expert that gets no token
takes no part in the step: its A_e and B_e get a zero gradient. QA-LoRA pools each weight group's input as
peft's QA-LoRA variant does on a linear (A_e then has one column per group), so it folds into the zero points.

peft's own route to 3-D expert weights (`LoraConfig(target_parameters=[...])`, `ParamWrapper`) parametrizes the
module's `nn.Parameter` with W + B A for every expert and refuses dropout; a packed base holds no such parameter.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from ..runtime.packed_experts import PackedExpertStack, spans


class PackedLoraExperts(nn.Module, LoraLayer):
    """Per-expert adapters on a PackedExpertStack; merging goes through qat.qlora.merge, not peft."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: float = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.qalora_group_size: dict[str, int] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.expert_out

    @property
    def num_experts(self) -> int:
        return self.get_base_layer().num_experts

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        for flag in ("use_dora", "lora_bias"):
            if getattr(config, flag, False):
                raise ValueError(f"{flag} is not built for expert adapters on a packed base; a packed base takes "
                                 "lora.variant=lora or qalora")
        if r <= 0:
            raise ValueError(f"lora.r={r}: the rank must be positive")
        cols = self.in_features
        if config.use_qalora:
            self.qalora_group_size[adapter_name] = config.qalora_group_size
            cols //= config.qalora_group_size
        e = self.num_experts
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.use_rslora[adapter_name] = config.use_rslora
        self.lora_bias[adapter_name] = False
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        # peft's default init per expert: A_e as kaiming_uniform(a=sqrt(5)) of an (r, cols) weight, B_e zero
        bound = 1 / math.sqrt(cols)
        self.lora_A[adapter_name] = nn.Parameter(torch.empty(e, r, cols).uniform_(-bound, bound))
        self.lora_B[adapter_name] = nn.Parameter(torch.zeros(e, self.out_features, r))
        if config.init_lora_weights is False:  # peft's "no init": B random too, the adapter changes the output
            nn.init.uniform_(self.lora_B[adapter_name], -1 / math.sqrt(r), 1 / math.sqrt(r))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, x: torch.Tensor, counts: list[int], *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, counts)
        if self.disable_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                result = result + self.adapter_output(adapter, x, counts).to(result.dtype)
        return result

    def adapter_output(self, adapter: str, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """B_e A_e x * scaling for the rows of each expert e (rows grouped by expert, as the stack takes them)."""
        a, b = self.lora_A[adapter], self.lora_B[adapter]
        x = self.lora_dropout[adapter](x.to(a.dtype))
        group = self.qalora_group_size.get(adapter)
        if group is not None:  # peft's QA-LoRA: each group's mean times the number of groups
            x = x.reshape(x.shape[0], -1, group).mean(-1) * (self.in_features // group)
        parts = [(x[lo:hi] @ a[e].t()) @ b[e].t() for e, lo, hi in spans(counts)]
        out = torch.cat(parts) if parts else x.new_zeros(0, self.out_features)
        return out * self.scaling[adapter]

    def group_delta(self, adapter: str) -> torch.Tensor:
        """QA-LoRA: the adapter's weight as one value per (stacked row, input group), (E*out, G), in fp32."""
        a, b = self._ab(adapter)
        groups = a.shape[-1]
        delta = (b @ a) * (self.scaling[adapter] * groups / self.qalora_group_size[adapter])
        return delta.reshape(-1, groups)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The adapter's weight over the stacked rows, (E*out, in) in fp32 (the stack's own row order)."""
        if adapter in self.qalora_group_size:
            return self.group_delta(adapter).repeat_interleave(self.qalora_group_size[adapter], dim=1)
        a, b = self._ab(adapter)
        return ((b @ a) * self.scaling[adapter]).reshape(-1, self.in_features)

    def _ab(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A[adapter], self.lora_B[adapter]
        wide = torch.float64 if a.dtype == torch.float64 else torch.float32
        return a.detach().to(wide), b.detach().to(wide)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError("a packed base merges through distqat (lora.merge=qalora, requant or bf16: "
                                  "qat.qlora.merge), not peft's merge")

    def unmerge(self) -> None:
        raise NotImplementedError("a packed base is never merged in place, so there is nothing to unmerge")


CUSTOM_MODULES: dict[type, type] = {PackedExpertStack: PackedLoraExperts}

"""The `lora` config section: the adapters, how they merge, and how the packed base is built."""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoRAConfig:
    r: int = field(default=16, metadata={"range": (1, 1 << 16)})
    alpha: float = field(default=32.0, metadata={"range": (1e-6, 1e6)})
    dropout: float = field(default=0.05, metadata={"range": (0.0, 0.9)})
    # Module-name patterns (fnmatch) of the packed linears that get adapters; empty: every one of them.
    target_modules: list[str] = field(default_factory=list)
    dtype: str = field(default="float32", metadata={"choices": DTYPES})  # of the adapters
    # qalora: the adapter sees each weight group's input pooled (QA-LoRA), so it folds exactly into the base.
    variant: str = field(default="lora", metadata={"choices": ("lora", "qalora")})
    # What train writes besides the adapters: qalora (into the zero points: an integer checkpoint),
    # requant (dequantized base + adapter, re-rounded: a PTQ folder), bf16 (a full-precision folder), none.
    merge: str = field(default="none", metadata={"choices": ("none", "qalora", "requant", "bf16")})
    # requant: rtn rounds onto the base's own grid (a zero adapter gives the base back bit for bit); gptq
    # quantizes the merged weight afresh with GPTQ (ptq.gptq settings) on calibration from the training text.
    requant: str = field(default="rtn", metadata={"choices": ("rtn", "gptq")})
    # An nf4 base quantized at load stores its group scales as int8 too (QLoRA's double quantization).
    double_quant: bool = True
    distill: bool = False  # also distil the full-precision model (KL) besides the loss on assistant tokens

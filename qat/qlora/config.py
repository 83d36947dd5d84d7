"""The `lora` config section: the adapters, how they merge, and how the packed base is built."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import setting

DTYPES = ("float32", "bfloat16", "float16")
REQUANT = ("rtn", "gptq", "gptq-grid", "gptq-keep")
CALIBRATED_REQUANT = ("gptq", "gptq-grid", "gptq-keep")  # the lora.requant choices that need calibration text


@dataclass
class LoRAConfig:
    r: int = setting(16, range=(1, 1 << 16), help="the adapters' rank")
    alpha: float = setting(32.0, range=(1e-6, 1e6), help="the adapters' scale is alpha / r")
    dropout: float = setting(0.05, range=(0.0, 0.9), help="dropout on the adapters' input")
    target_modules: list[str] = setting(factory=list, help="module-name patterns (fnmatch) of the packed linears "
                                        "that get adapters; empty: every one of them")
    dtype: str = setting("float32", choices=DTYPES, help="the adapters' dtype")
    variant: str = setting("lora", choices=("lora", "qalora"), help="qalora: the adapter sees each weight group's "
                           "input pooled (QA-LoRA), so it folds exactly into the base")
    merge: str = setting("none", choices=("none", "qalora", "requant", "bf16"), help="what train writes besides "
                         "the adapters: qalora (into the zero points: an integer checkpoint), requant (dequantized "
                         "base + adapter, re-rounded: a PTQ folder), bf16 (a full-precision folder), none")
    requant: str = setting("rtn", choices=REQUANT, help="merge=requant: rtn rounds onto the base's own grid (a "
                           "zero adapter gives the base back bit for bit); gptq quantizes the merged weight afresh "
                           "(ptq.gptq settings) on calibration from the training text; gptq-grid rounds it onto the "
                           "base's own grid with GPTQ's error feedback on that calibration (only codes move; a zero "
                           "adapter gives the base back); gptq-keep likewise, but keeps every base code the merged "
                           "weight still rounds to")
    requant_damp: float = setting(0.001, range=(0.0, 10.0), help="GPTQ's damping in the gptq, gptq-grid and "
                                  "gptq-keep merges (replaces ptq.gptq.damp there): an adapter moves weights far "
                                  "less than a grid step, and PTQ's 0.1 suppresses the coordinated code flips that "
                                  "keep it (bundled int4 recipe: 1-4% of the gain kept at 0.1, 21-23% at 0.001)")
    double_quant: bool = setting(True, help="an nf4 base quantized at load stores its group scales as int8 too "
                                 "(QLoRA's double quantization)")
    adapter: str = setting("", group="use", help="eval and generate: run the model with this adapter folder on "
                           "it, un-merged (a QLoRA run's <output_dir>/adapters, or a peft LoRA folder trained on the "
                           "same model); the model is held packed as in QLoRA training: model.name_or_path is a base "
                           "model (quantized at load with the adapter's spec), a ptq/train output or a converted "
                           "integer checkpoint")
    distill: bool = setting(False, help="also distil the full-precision model (KL) besides the loss on assistant "
                            "tokens")

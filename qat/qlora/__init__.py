"""QLoRA-style finetuning: a frozen base held packed (integer codes or NF4), peft adapters on it, and merges
that land in the integer checkpoint.

    from qat.qlora.adapters import add_adapters
    from qat.qlora.base import build_base
    from qat.qlora.config import LoRAConfig
    base, folder = build_base("bundled:smollm2-135m", qat.spec.parse("w4g64"))
    model = add_adapters(base, LoRAConfig(r=16))          # a peft PeftModel; only lora_ parameters train

Modules: `base` (building the packed base, its fingerprint), `adapters` (peft; importing it registers the packed
layers with peft), `adapter_fit` (does an adapter fit a base, a checkpoint's layout), `use` (base + adapter
un-merged, for eval and generate), `expert_adapters` (per-expert LoRA on packed MoE experts), `merge` (qalora,
requant, bf16), `config` (the `lora` section); the packed layers
themselves are `qat.runtime.packed.PackedLinear` and `qat.runtime.packed_experts.PackedExperts`. The package
itself imports none of them, so the run-config schema reads `config` without importing peft.
"""

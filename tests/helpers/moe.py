"""Tiny random mixture-of-experts models: hand-written configs for six families (`tiny_moe`), and a generic
shrinker for every family transformers can build whose experts are fused 3-D parameters (`moe_families`,
`build_tiny`). `python -m tests.helpers.moe` prints what each family builds.

Experts run eagerly (config._experts_implementation = "eager"). Left unset, transformers 5.24 resolves it to
"grouped_mm" for every `@use_experts_implementation` class, on CPU too (PreTrainedModel.
get_correct_experts_implementation; "eager" only for undecorated classes): torch.nn.functional.grouped_mm over
the whole 3-D weight there, a loop of torch.mm over the selected rows in eager.
"""

from __future__ import annotations

import copy
import functools
import sys

import torch
import transformers as tf
from torch import nn

from .moe_shrink import VOCAB, build, experts_classes, moe_family_aliases, sample_ids

NAMED = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss", "deepseek_v3")
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

__all__ = ["NAMED", "build_tiny", "expert_hits", "experts_classes", "experts_modules", "fused_params",
           "moe_families", "sample_ids", "tiny_moe"]


def _named_config(family: str):
    if family == "qwen3_moe":  # every layer sparse; q/k norms; 6 experts, a count no other size shares
        return tf.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32, num_experts=6,
                                 num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    if family == "mixtral":  # experts sized by intermediate_size
        return tf.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    if family == "olmoe":
        return tf.OlmoeConfig(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=32, num_experts=4,
                              num_experts_per_tok=2)
    if family == "qwen2_moe":  # routed experts + shared_expert (an MLP) + shared_expert_gate (Linear(H, 1))
        return tf.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                 decoder_sparse_step=1, mlp_only_layers=[])
    if family == "gpt_oss":  # transposed (E, in, out) experts with biases; sliding + full attention; sinks
        common = {**COMMON, "max_position_embeddings": 131072}  # = YaRN's factor 32 x original 4096: no warning
        return tf.GptOssConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                               sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    if family == "deepseek_v3":  # MLA attention, layer 0 dense, layers 1-2 routed + shared experts, grouped top-k
        common = {k: v for k, v in COMMON.items() if k != "head_dim"}  # head_dim: the rotary part, qk_rope_head_dim
        return tf.DeepseekV3Config(**{**common, "num_hidden_layers": 3, "num_key_value_heads": 4},
                                   intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
                                   n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                                   first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                   qk_nope_head_dim=8, v_head_dim=16)
    raise ValueError(f"no tiny config for {family!r}; one of {NAMED}")


def tiny_moe(family: str, seed: int = 0) -> tf.PreTrainedModel:
    """A fresh random float32 model of `family` (one of NAMED) in eval mode, a few hundred KB, experts eager."""
    cfg = _named_config(family)
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@functools.cache
def _aliases() -> dict[str, str]:
    return moe_family_aliases()


def moe_families() -> list[str]:
    """Every model_type with `*Experts` classes in its modeling module and a causal LM, composite types folded into
    the text model_type they build (gemma4 -> gemma4_text, llama4 -> llama4_text, ...)."""
    return sorted(set(_aliases().values()))


_BUILT: dict[str, tuple[nn.Module | None, str]] = {}


def build_tiny(model_type: str) -> tuple[nn.Module | None, str]:
    """(a fresh copy of the family's tiny random model | None, reason): built once per process, copied per call."""
    if model_type not in _BUILT:
        _BUILT[model_type] = build(_aliases().get(model_type, model_type))
    model, reason = _BUILT[model_type]
    return (copy.deepcopy(model) if model is not None else None), reason


def fused_params(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: shape} of an experts module's fused weights: its parameters of two or more dimensions outside any
    nn.Linear, biases aside (3-D (E, out, in) or transposed (E, in, out); dbrx stacks them 2-D: (E * I, H))."""
    linear = {f"{n}." for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    return {n: tuple(p.shape) for n, p in module.named_parameters()
            if p.dim() >= 2 and not n.endswith("bias") and not any(n.startswith(pre) for pre in linear)}


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost `*Experts` modules holding fused expert weights, by qualified name."""
    found: list[tuple[str, nn.Module]] = []
    for n, m in model.named_modules():
        if type(m).__name__.endswith("Experts") and not any(n.startswith(f"{o}.") for o, _ in found):
            if fused_params(m):
                found.append((n, m))
    return found


def _routing_index(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The (tokens, top_k) expert-index tensor an experts forward receives (second argument on the common
    signature `forward(hidden_states, top_k_index, top_k_weights)`)."""
    cands = [*args[1:], *kwargs.values()]
    return next((t for t in cands if isinstance(t, torch.Tensor) and not t.is_floating_point()), None)


def expert_hits(model: nn.Module, input_ids: torch.Tensor) -> dict[str, list[int]]:
    """{experts module: tokens routed to each expert} over one forward of `input_ids`."""
    hits: dict[str, list[int]] = {}
    handles = []
    for name, m in experts_modules(model):
        n_experts = getattr(m, "num_experts", None) or next(iter(fused_params(m).values()))[0]

        def count(mod, args, kwargs, name=name, n_experts=n_experts):
            idx = _routing_index(args, kwargs)
            if idx is not None:
                hits[name] = torch.bincount(idx.flatten().clamp(max=n_experts), minlength=n_experts)[:n_experts]
                hits[name] = hits[name].tolist()

        handles.append(m.register_forward_pre_hook(count, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hits


def _row(family: str, model: nn.Module | None, reason: str) -> str:
    if model is None:
        return f"{family:22s} -- {reason}"
    mods = experts_modules(model)
    shapes = {}
    for _, m in mods:
        for k, v in fused_params(m).items():
            shapes.setdefault(f"{type(m).__name__}.{k}", v)
    impl = getattr(model.config, "_experts_implementation", None)
    fused = ", ".join(f"{k}{list(v)}" for k, v in shapes.items())
    return f"{family:22s} ok {reason.removeprefix('built: '):32s} experts modules: {len(mods)} [{impl}] {fused}"


def main(argv: list[str]) -> int:
    tf.logging.set_verbosity_error()
    families = argv or moe_families()
    aliases = _aliases()
    folded = {k: v for k, v in aliases.items() if k != v}
    built = 0
    for family in families:
        model, reason = build_tiny(family)
        built += model is not None
        print(_row(family, model, reason), flush=True)
    print(f"\n{built} of {len(families)} families built tiny; composite types folded into their text model: "
          + ", ".join(f"{k} -> {v}" for k, v in sorted(folded.items())))
    for family in NAMED if not argv else ():
        hits = expert_hits(tiny_moe(family), sample_ids())
        print(f"tiny_moe({family!r}): tokens per expert {hits}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

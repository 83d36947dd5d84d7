"""The generic shrinker behind helpers.moe.build_tiny: a family's default config with every size-like field it
knows made tiny (hidden 64, 2-4 layers, 4 experts, top-2, vocab 128), built with random weights."""

from __future__ import annotations

import dataclasses
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers as tf
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES, model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 128
MAX_PARAMS = 5_000_000  # a tiny build with more than this is a shrinker gap, not a tiny model
MAX_LAYERS = 4  # the layers kept when a family's per-layer lists need more than two to show every kind

# field -> its tiny value; a default smaller than this is kept (min), None stays None (no LoRA rank, no window)
SIZES = {
    "hidden_size": 64, "d_model": 64,
    "intermediate_size": 64, "ffn_hidden_size": 64, "dense_intermediate_size": 64, "intermediate_size_mlp": 64,
    "moe_intermediate_size": 32, "expert_ffn_hidden_size": 32, "shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32, "shared_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32,
    "num_attention_heads": 4, "n_heads": 4, "swa_num_attention_heads": 4, "linear_num_heads": 4,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "swa_num_key_value_heads": 2, "index_n_heads": 2,
    "mamba_n_heads": 8, "mamba_num_heads": 8,
    "head_dim": 16, "swa_head_dim": 16, "kv_channels": 16, "linear_head_dim": 16, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "index_head_dim": 16, "v_head_dim": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
    "rotary_dim": 8, "mamba_head_dim": 16, "mamba_d_head": 16, "mamba_d_state": 8, "ssm_state_size": 8,
    "mamba_dt_rank": 8, "mamba_chunk_size": 16, "chunk_size": 16, "n_groups": 1,
    "q_lora_rank": 32, "kv_lora_rank": 16, "o_lora_rank": 16, "hc_lowrank": 8, "loop_gate_rank": 8,
    "router_hidden_size": 16, "hidden_size_per_layer_input": 16, "ple_embed_dim": 16, "rel_extent": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "top_k_experts": 2, "top_k": 2, "moe_topk": 2,
    "moe_k": 2, "moe_top_k": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1, "zero_expert_num": 2,
    "n_group": 2, "n_groups_routed": 2, "num_expert_group": 2, "topk_group": 1, "o_groups": 2,
    "index_topk": 4, "index_topk_blocks": 2, "index_block_size": 4, "block_size": 4,
    "sliding_window": 16, "sliding_window_size": 16, "attention_chunk_size": 16,
    "max_position_embeddings": 512, "max_seq_len": 512, "model_max_length": 512,
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB,
    "ngram_vocab_size_base": VOCAB, "split_ngram_parts": 2, "make_ngram_vocab_size_divisible_by": 8,
    "global_attn_every_n_layers": 2, "no_rope_layer_interval": 2, "sliding_window_pattern": 2,
    "n_layers_per_attn_res_block": 1, "layer_group_size": 2,
}
# Sizes some configs default to None where the model then fails: set even then (hunyuan_v1_moe reads head_dim raw;
# 16 = 64 hidden / 4 heads, what a None head_dim means elsewhere)
SET_IF_NONE = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
               "top_k", "moe_topk", "moe_k", "top_k_experts", "moe_intermediate_size", "n_shared_experts", "head_dim")
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
MOE_SWITCHES = ("enable_moe_block",)  # booleans that turn a family's experts on (gemma4: off by default)
LAYER_COUNTS = ("num_hidden_layers", "n_layers", "num_layers")
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "eod_token_id", "decoder_start_token_id")
# per-layer lists of layer indices: remapped onto the kept layers
INDEX_LISTS = ("moe_layers", "ple_layer_ids", "mlp_only_layers", "full_attn_idxs", "linear_attn_idxs")
# counts of leading dense layers (layer 0 dense, the rest sparse)
DENSE_PREFIX = ("first_k_dense_replace", "num_dense_layers")

# Families the generic rules get wrong: field -> value applied last (keep this short; say why on each)
OVERRIDES: dict[str, dict] = {
    # modeling_dbrx reads attn_config.rope_theta (no such field) and clamps by clip_qkv (None by default)
    "dbrx": {"attn_config": {"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # default None, read per layer
    # QSA indexer fields are all None by default, yet every 4th layer is indexed_attention
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 2},
    "granitemoehybrid": {"layer_types": ["full_attention", "linear_attention"]},  # default: all mamba
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0},  # one attention and one mamba layer of the two
}


def _sources(model_type: str, kind: str = "modeling") -> list[str]:
    folder = Path(tf.__file__).parent / "models" / model_type_to_module_name(model_type)
    return [p.read_text() for p in sorted(folder.glob(f"{kind}_*.py"))] if folder.is_dir() else []


def experts_classes(model_type: str) -> list[str]:
    """The `*Experts` classes the family's modeling module defines (they hold the fused 3-D expert weights)."""
    return sorted({c for src in _sources(model_type) for c in re.findall(r"^class (\w*Experts)\(", src, re.M)})


def text_model_type(model_type: str) -> str | None:
    """The model_type whose causal LM this family builds: itself, or its text sub-config's (composite configs);
    None when neither has a causal-LM class."""
    if not any("text_config" in src for src in _sources(model_type, "configuration")):
        return model_type if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None  # no config import: faster
    cls = CONFIG_MAPPING[model_type]
    for key, sub in (getattr(cls, "sub_configs", None) or {}).items():
        sub_type = getattr(sub, "model_type", None)
        if key == "text_config" and sub_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and sub_type != model_type:
            return sub_type
    return model_type if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None


def moe_family_aliases() -> dict[str, str]:
    """{model_type: the text model_type built for it} for every type with `*Experts` and a causal LM."""
    out = {}
    for mt in CONFIG_MAPPING_NAMES:
        if experts_classes(mt) and (text := text_model_type(mt)) is not None:
            out[mt] = text
    return out


def _init_fields(cfg) -> list[str]:
    if dataclasses.is_dataclass(cfg):
        return [f.name for f in dataclasses.fields(cfg) if f.init]
    return list(cfg.to_dict())


def _pick_layers(per_layer: dict[str, list], n_layers: int) -> list[int]:
    """Indices of the layers to keep: the first layer of every distinct combination of the per-layer lists'
    values (up to MAX_LAYERS), at least two."""
    keep, seen = [], set()
    for i in range(n_layers):
        key = tuple(repr(v[i]) for v in per_layer.values())
        if key not in seen and len(keep) < MAX_LAYERS:
            seen.add(key)
            keep.append(i)
    for i in range(n_layers):
        if len(keep) >= min(2, n_layers):
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _tiny_token_id(v):
    if isinstance(v, list):
        return [_tiny_token_id(x) for x in v]
    return v % VOCAB if isinstance(v, int) and v >= VOCAB else v


def _shrink_sizes(vals: dict) -> dict:
    """The size-like fields of `vals` (a config's fields, or one layer's overrides) at their tiny values."""
    out: dict = {}
    for name, v in vals.items():
        if isinstance(v, bool):
            if name in MOE_SWITCHES and not v:
                out[name] = True
        elif name in EXPERT_COUNTS and isinstance(v, int) and v != SIZES[name]:
            out[name] = SIZES[name]  # 4 even where the default is 1 (hunyuan_v1_moe)
        elif name in SIZES and isinstance(v, int) and v > SIZES[name]:
            out[name] = SIZES[name]
        elif name in SIZES and v is None and name in SET_IF_NONE:
            out[name] = SIZES[name]
        elif name in TOKEN_IDS and v is not None:
            out[name] = _tiny_token_id(v)
        elif isinstance(v, tf.PretrainedConfig):
            out[name] = type(v)(**shrink_kwargs(v))
    heads, kv = vals.get("num_attention_heads"), vals.get("num_key_value_heads")
    if isinstance(kv, int):
        out["num_key_value_heads"] = out.get("num_attention_heads", heads) if kv == heads else min(kv, 2)
    if vals.get("head_dim") is not None and vals["head_dim"] == vals.get("qk_rope_head_dim"):
        out["head_dim"] = out["qk_rope_head_dim"]  # MLA: head_dim names the rotary part
    if isinstance(vals.get("qk_head_dim"), int):
        out["qk_head_dim"] = out.get("qk_nope_head_dim", 0) + out.get("qk_rope_head_dim", 0)
    return out


def _shrink_layers(vals: dict, n_layers: int, per_layer_overrides: dict | None) -> dict:
    """Layer counts, per-layer lists and layer-index fields for the kept layers."""
    per_layer = {k: v for k, v in vals.items() if isinstance(v, list) and len(v) == n_layers and n_layers > 2}
    keep = _pick_layers(per_layer, n_layers) if per_layer else list(range(min(2, n_layers)))
    n = len(keep)
    out: dict = {k: n for k in LAYER_COUNTS if isinstance(vals.get(k), int)}
    for k, v in per_layer.items():
        if k not in INDEX_LISTS:
            out[k] = [min(v[i], 4) if "heads" in k and isinstance(v[i], int) else v[i] for i in keep]
    for k in INDEX_LISTS:
        if isinstance(vals.get(k), list) and vals[k]:
            out[k] = [j for j, i in enumerate(keep) if i in vals[k]]
            if k == "mlp_only_layers":
                out[k] = [0]  # layer 0 dense, the others sparse
            elif k == "moe_layers" and not out[k]:
                out[k] = [n - 1]
    for k, v in vals.items():
        if not isinstance(v, int) or isinstance(v, bool):
            continue
        if k in DENSE_PREFIX and v > 0:
            out[k] = 1
        elif k.endswith("_period") and v > 2:
            out[k] = 2
        elif k.endswith("_offset"):
            out[k] = v % (out.get(k.replace("_offset", "_period")) or vals.get(k.replace("_offset", "_period")) or 1)
        elif k in ("max_window_layers", "loop_layer_index_end"):
            out[k] = min(v, n)
        elif k == "moe_layer_end_index":
            out[k] = min(v, n - 1)
        elif k == "loop_layer_index_start":
            out[k] = 1
    if per_layer_overrides is not None:  # heterogeneous configs: each kept layer's own overrides, shrunk alike
        out["per_layer_config"] = {j: {**d, **_shrink_sizes(d)} for j, i in enumerate(keep)
                                   if (d := per_layer_overrides.get(i))}
    return out


def shrink_kwargs(cfg) -> dict:
    """The constructor kwargs that turn `cfg`'s class defaults into a tiny config."""
    spec = getattr(cfg, "_heterogeneity_spec", None)
    if spec is not None:
        cfg.allow_global_per_layer_attribute_access = True  # read the global values; per-layer ones are in spec
    vals = {f: getattr(cfg, f, None) for f in _init_fields(cfg)}
    out = _shrink_sizes(vals)
    n_layers = next((vals[k] for k in LAYER_COUNTS if isinstance(vals.get(k), int)), None)
    if n_layers is not None:
        out.update(_shrink_layers(vals, n_layers, spec.per_layer_overrides if spec is not None else None))
    return out


def tiny_config(model_type: str):
    """The family's tiny text config (the text sub-config for composite families), experts run eagerly."""
    text = text_model_type(model_type) or model_type
    cfg = CONFIG_MAPPING[text]()
    kwargs = shrink_kwargs(cfg)
    kwargs.update(OVERRIDES.get(text, OVERRIDES.get(model_type, {})))
    tiny = type(cfg)(**kwargs)
    tiny._experts_implementation = "eager"
    return tiny


class BuildTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Raise BuildTimeout in the block after `seconds` (SIGALRM: only on the main thread; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(*_):
        raise BuildTimeout(f"took more than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def reason_of(stage: str, e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:160]
    return f"{stage}: {type(e).__name__}: {first}"


def build(model_type: str, seed: int = 0, limit_s: float = 10.0):
    """(tiny random float32 model in eval mode | None, reason): the config shrunk, counted on the meta device,
    then built for real under a time limit and run once on a short input."""
    try:
        cfg = tiny_config(model_type)
    except Exception as e:
        return None, reason_of("config", e)
    try:
        with time_limit(limit_s), torch.device("meta"):
            meta = tf.AutoModelForCausalLM.from_config(cfg)
        n = sum(p.numel() for p in meta.parameters())
    except (Exception, BuildTimeout) as e:
        return None, reason_of("meta build", e)
    if n > MAX_PARAMS:
        return None, f"too big: {n:,} parameters after shrinking (limit {MAX_PARAMS:,})"
    t0 = time.perf_counter()
    try:
        with time_limit(limit_s):
            torch.manual_seed(seed)
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    except (Exception, BuildTimeout) as e:
        return None, reason_of("build", e)
    try:
        with time_limit(limit_s), torch.no_grad():
            logits = model(input_ids=sample_ids(seed), use_cache=False).logits
    except (Exception, BuildTimeout) as e:
        return None, reason_of("forward", e)
    if not torch.isfinite(logits).all():
        return None, "forward: logits not finite"
    return model, f"built: {n:,} parameters in {time.perf_counter() - t0:.2f} s"


def sample_ids(seed: int = 0, length: int = 32) -> torch.Tensor:
    """A short random input (1, length): token ids from 3 up (below are the special ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=g)

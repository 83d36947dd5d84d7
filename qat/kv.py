"""KV-cache fake quantization through transformers' attention-function interface.

Every model whose attention calls `ALL_ATTENTION_FUNCTIONS` (Llama, Qwen2/3, Mistral, Gemma, Phi-3 ...)
hands the attention function its keys after RoPE and after the cache update, i.e. exactly the tensors
a real cache stores. We register wrappers (named `keys.KV_ATTENTION_PREFIX` + `sdpa`, `eager` ...) that
fake-quantize K and V with the attention module's `k_quantizer` / `v_quantizer` and then call the
original implementation, so no modeling code is copied. A model with the online R3 rotation (qat.online) turns its
queries and keys there too, before K is quantized; such a model runs through the wrapper even with no KV quantizers.

The cache itself keeps high-precision values and the whole K/V is fake-quantized at every step. With
per-token (or per-head) scales each token's codes depend on that token alone, so this equals attention
over a cache that stored quantized tokens — which is why dynamic per-tensor kv scales are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .keys import KV_ATTENTION_PREFIX
from .quantizers import ActQuantizer
from .spec import TensorSpec

# Set on K/V tensors that an integer cache (qat.runtime.kv_cache) returns: already quantized, bit for bit
# what fake quant would give, so quantizing them again would only add rounding noise.
QUANTIZED_MARK = "_distqat_kv_quantized"
# Set on keys that cache turned by the attention module's R3 before quantizing them (qat.online): not turned again.
ROTATED_MARK = "_distqat_kv_rotated"
# The attention module's attribute holding R3 (a qat.hadamard.Rotation of head_dim), set by qat.online.install.
QK_ROTATION = "qk_rotation"


def kv_rows(x: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) -> rows: per head and token, per token (all heads), or one row."""
    if spec.granularity == "head":
        return x.reshape(-1, x.shape[-1])
    if spec.granularity == "token":
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b * t, h * d)
    return x.reshape(1, -1)


def fake_quant_kv(quantizer: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
    fast = getattr(quantizer, "fast_kv", None)  # qat.fast's kv_direct: these numbers without the row copies
    if fast is not None:
        out = fast(quantizer, x)
        if out is not None:
            return out
    spec = quantizer.spec
    if spec.granularity != "token":
        return quantizer(x, rows=kv_rows(x, spec))
    b, h, t, d = x.shape
    y = quantizer(x.transpose(1, 2), rows=kv_rows(x, spec))  # a (b, t, h, d) result
    return y.reshape(b, t, h, d).transpose(1, 2)


def _base_function(base: str, module: nn.Module) -> Callable:
    # lazy: transformers.modeling_utils takes seconds to import and only KV-quantized attention needs it
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":
        # Each model file has its own eager attention (softcapping, sinks ...): use the module's.
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to wrap; use sdpa")
        return fn
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_wrapper(base: str) -> Callable:
    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs: Any):
        kq, vq = getattr(module, "k_quantizer", None), getattr(module, "v_quantizer", None)
        rot = getattr(module, QK_ROTATION, None)
        if (kq is None or vq is None) and (rot is None or kq is not None or vq is not None):
            raise RuntimeError(
                f"{type(module).__name__} runs KV-quantized attention but has no k/v quantizers; "
                "apply qat.apply.quantize_model to the whole model"
            )
        if rot is not None:  # R3: q H (k H)^T = q k^T, and the cache quantizes the turned keys
            query = rot(query)
            if not getattr(key, ROTATED_MARK, False):
                if getattr(key, QUANTIZED_MARK, False):
                    raise RuntimeError(f"{type(module).__name__}: the integer KV cache quantized keys before the "
                                       "model's R3 rotation; build it with IntKVCache(spec, layers, "
                                       "key_rotation=qat.online.key_rotation(model))")
                key = rot(key)
        if kq is not None and not getattr(key, QUANTIZED_MARK, False):
            key = fake_quant_kv(kq, key)
        if vq is not None and not getattr(value, QUANTIZED_MARK, False):
            value = fake_quant_kv(vq, value)
        return _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{KV_ATTENTION_PREFIX}{base}"
    return attention


def register(base: str) -> str:
    """Register the KV-quant wrapper of attention implementation `base`; returns its name."""
    # lazy: transformers.modeling_utils takes seconds to import and only KV-quantized models need it
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # lazy: as modeling_utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if base.startswith(KV_ATTENTION_PREFIX):
        return base
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {base!r} is not registered in transformers")
    name = KV_ATTENTION_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_wrapper(base))
        # The causal mask is built per implementation name: reuse the base's mask format.
        mask_fn = ALL_MASK_ATTENTION_FUNCTIONS.get(base) or ALL_MASK_ATTENTION_FUNCTIONS["eager"]
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_fn)
    return name


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that call the attention interface: one per layer, named `*Attention`."""
    return [
        (n, m) for n, m in model.named_modules()
        if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx") and hasattr(m, "config")
    ]


def install(model: nn.Module, spec: TensorSpec) -> list[str]:
    """Attach k/v quantizers to every attention module and switch the model to the wrapper."""
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
            "so its KV cache cannot be quantized here; set quant.kv=null"
        )
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention modules in {type(model).__name__} to quantize the KV cache of")
    device = next(model.parameters()).device
    for _, m in modules:
        m.k_quantizer = ActQuantizer(spec).to(device)
        m.v_quantizer = ActQuantizer(spec).to(device)
    base = model.config._attn_implementation or "sdpa"
    set_attention(model, register(base))
    return [n for n, _ in modules]


def set_attention(model: nn.Module, name: str) -> None:
    """Point the model (and every sub-config) at attention implementation `name`."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


def uninstall(model: nn.Module) -> None:
    """Undo `install`: no k/v quantizers, the model back on the attention implementation it wrapped."""
    for _, m in attention_modules(model):
        for name in ("k_quantizer", "v_quantizer"):
            if hasattr(m, name):
                delattr(m, name)
    current = getattr(model.config, "_attn_implementation", None) or ""
    if current.startswith(KV_ATTENTION_PREFIX):
        set_attention(model, current[len(KV_ATTENTION_PREFIX):])

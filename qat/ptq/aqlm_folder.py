"""The AQLM folder: config.json holds transformers' `quantization_config` {"quant_method": "aqlm", ...} and
distqat's AQLM_KEY record (the kind `qat.io.folders.inspect` names aqlm); the weights are the `AQLMLinear` layers'
(`qat.runtime.aqlm`, the layout transformers' AQLM integration reads). It lives beside the PTQ part that writes it
(as LLM.int8()'s record does); `qat.load` reads it through `load_aqlm`, which needs no `aqlm` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..io.models import ModelError, check_remote_code
from ..keys import AQLM_KEY, HF_QUANT_KEY
from ..linear import QuantLinear
from ..runtime.aqlm import AQLMLinear, bits_per_weight


def aqlm_config(num_codebooks: int, nbits: int, in_group_size: int, skip: list[str]) -> dict[str, Any]:
    """transformers' AqlmConfig as config.json holds it. `skip` names the linears left in full precision (both
    as modules, which transformers 5 matches, and as `.weight`, the form older versions compared)."""
    return {"quant_method": "aqlm", "in_group_size": in_group_size, "out_group_size": 1,
            "num_codebooks": num_codebooks, "nbits_per_codebook": nbits,
            "linear_weights_not_to_quantize": [f for n in skip for f in (n, n + ".weight")]}


def finish_model(model: nn.Module, num_codebooks: int, nbits: int, in_group_size: int) -> dict[str, Any]:
    """Record the AQLM layout in model.config; returns distqat's record (total bits per weight included)."""
    left = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.weight_quantizer is not None]
    if left:
        raise ValueError(f"ptq.method=aqlm codes the decoder layers' linears only; exclude {left[:3]} in quant.exclude")
    coded = [m for m in model.modules() if isinstance(m, AQLMLinear)]
    weights = sum(m.in_features * m.out_features for m in coded)
    bits = sum(bits_per_weight(m) * m.in_features * m.out_features for m in coded)
    skip = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    record = {"num_codebooks": num_codebooks, "nbits_per_codebook": nbits, "in_group_size": in_group_size,
              "bits_per_weight": bits / max(weights, 1), "coded_weights": weights}
    setattr(model.config, HF_QUANT_KEY, aqlm_config(num_codebooks, nbits, in_group_size, skip))
    setattr(model.config, AQLM_KEY, record)
    return record


def load_aqlm(path: Path, record: dict[str, Any], dtype: Optional[torch.dtype] = None,
              **kwargs: Any) -> nn.Module:
    """An AQLM folder with AQLMLinear layers (no `aqlm` package needed), in eval mode; kwargs as from_config's
    (attn_implementation, trust_remote_code)."""
    remote = kwargs.get("trust_remote_code", False)
    check_remote_code(Path(path), remote)
    cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=remote)
    if hasattr(cfg, HF_QUANT_KEY):
        delattr(cfg, HF_QUANT_KEY)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    if dtype is None:
        dtype = next((t.dtype for k, t in tensors.items() if k.endswith(".codebooks")), torch.float32)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **kwargs)
    m_books, nbits, g = record["num_codebooks"], record["nbits_per_codebook"], record["in_group_size"]
    for name in [k[: -len(".codes")] for k in tensors if k.endswith(".codes")]:
        lin = model.get_submodule(name)
        model.set_submodule(name, AQLMLinear(lin.in_features, lin.out_features, m_books, nbits, g,
                                             lin.bias is not None, dtype))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
    missing = [k for k in missing if not (k in tied and getattr(cfg, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ModelError(f"{path}: AQLM folder does not match its model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    return model.eval()

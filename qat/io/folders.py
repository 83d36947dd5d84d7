"""The one reader of saved folders: what a folder holds (its kind and spec), and loading the fake-quant kinds.

Every command that takes a model folder asks `inspect` first: it reads config.json once and names the
kind from the keys of `qat.keys`. `qat.load.load` dispatches on the kind; the kinds built from the
numerics alone (base and fake-quant models) load here, the LLM.int8(), integer and foreign kinds in their
packages. Another tool's quantized folder (GPTQ, AWQ, compressed-tensors without distqat's record) is its own kind,
checked by `qat.io.foreign` when inspected, so no reader takes it for a plain model and rounds it again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

try:  # transformers >= 5 renames checkpoint keys on load and back on save
    from transformers.core_model_loading import revert_weight_conversion
except ImportError:
    revert_weight_conversion = None

from ..apply import quantize_model, quantizer_keys
from ..keys import AQLM_KEY, EXPORT_KEY, HF_QUANT_KEY, LLM_INT8_KEY, PTQ_KEY, QUANT_KEY
from ..spec import QuantSpec, SpecError
from .foreign import describe, foreign_config
from .models import ModelError, check_remote_code, read_config, resolve_model_path

_CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Kind(str, Enum):
    BASE = "base"  # a plain Hugging Face causal LM (or a bundled: name)
    QAT = "qat"  # fake-quantized, as `distqat train` writes its student
    PTQ = "ptq"  # fake-quantized with the PTQ grid frozen in its quantizers, as `distqat ptq` writes
    LLM_INT8 = "llm_int8"  # LLM.int8(): fp weights, int8 matmul with fp16 outliers at run time
    INT = "int"  # packed integer weights (compressed-tensors), as `distqat convert` writes
    AQLM = "aqlm"  # AQLM codes + codebooks + scales (transformers' AQLM layout), as `ptq.method=aqlm` writes
    FOREIGN = "foreign"  # another tool's quantized folder: GPTQ, AWQ (GEMM), compressed-tensors (`qat.io.foreign`)


@dataclass(frozen=True)
class Folder:
    """A saved model folder as `inspect` read it."""

    name: str  # as given: a path or a bundled: name
    path: Path
    kind: Kind
    config: dict[str, Any] = field(repr=False)
    spec: Optional[QuantSpec] = None  # the quantization (QAT, PTQ, INT, FOREIGN); None for BASE and LLM_INT8
    record: dict[str, Any] = field(default_factory=dict)  # the kind's own record (PTQ method, int8 threshold ...)

    @property
    def dtype(self) -> torch.dtype:
        return config_dtype(self.config)

    @property
    def label(self) -> str:
        """How results name this model: 'fp', the scheme with '(saved)' or '(int)', 'llm_int8 (saved)'."""
        if self.kind is Kind.BASE:
            return "fp"
        if self.kind is Kind.LLM_INT8:
            return "llm_int8 (saved)"
        if self.kind is Kind.AQLM:
            return f"aqlm {self.record.get('num_codebooks')}x{self.record.get('nbits_per_codebook')} (saved)"
        if self.kind is Kind.INT:
            return f"{spec_label(self.spec) if self.spec is not None else 'int'} (int)"
        if self.kind is Kind.FOREIGN:
            return f"{spec_label(self.spec, 'int')} ({self.record['format']})"
        return f"{spec_label(self.spec, 'quant')} (saved)"


def spec_label(spec: Optional[QuantSpec], fallback: str = "quant") -> str:
    """The short name of a spec ('w4a8kv8'), or `fallback` where it has none (custom settings). A PTQ grid
    frozen in lsq quantizers is named by the grid it froze."""
    if spec is None:
        return fallback
    for candidate in (spec, replace(spec, weight=replace(spec.weight, learnable="none")) if spec.weight else spec):
        try:
            return candidate.name
        except ValueError:
            continue
    return fallback


def config_dtype(cfg: dict[str, Any]) -> torch.dtype:
    """The dtype a model folder's config.json records (transformers writes `dtype`, older `torch_dtype`)."""
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    return _CONFIG_DTYPES.get(name, torch.bfloat16)


def _spec(d: Any, file: Path, key: str) -> QuantSpec:
    try:
        return QuantSpec.from_dict(d)
    except (SpecError, TypeError) as e:
        raise ModelError(f"{file}: {key} is not a valid quantization spec ({e}); save the model again") from None


def inspect(name_or_path: Union[str, Path], what: str = "model.name_or_path") -> Folder:
    """The folder's kind, spec and config; ModelError (one line, naming the argument `what`) for a missing
    folder or a broken config."""
    path = resolve_model_path(name_or_path, what)
    cfg = read_config(path)
    file = path / "config.json"
    name = str(name_or_path)
    if AQLM_KEY in cfg:
        return Folder(name, path, Kind.AQLM, cfg, None, dict(cfg[AQLM_KEY] or {}))
    if EXPORT_KEY in cfg and HF_QUANT_KEY in cfg:
        meta = cfg[EXPORT_KEY] or {}
        spec = _spec(meta["spec"], file, EXPORT_KEY) if meta.get("spec") else None
        return Folder(name, path, Kind.INT, cfg, spec, meta)
    foreign = foreign_config(cfg, path) if EXPORT_KEY not in cfg else None
    if foreign is not None:  # read as stored, never rounded again: not a plain model
        spec, record = describe(foreign, path)
        return Folder(name, path, Kind.FOREIGN, cfg, spec, record)
    if LLM_INT8_KEY in cfg:
        return Folder(name, path, Kind.LLM_INT8, cfg, None, dict(cfg[LLM_INT8_KEY] or {}))
    ptq = cfg.get(PTQ_KEY)
    if QUANT_KEY in cfg:
        spec = _spec(cfg[QUANT_KEY], file, QUANT_KEY)
        return Folder(name, path, Kind.PTQ if ptq else Kind.QAT, cfg, spec, dict(ptq or {}))
    if ptq is not None:
        if (ptq or {}).get("method") == "llm_int8":  # written before LLM.int8() had its own record
            return Folder(name, path, Kind.LLM_INT8, cfg, None, dict(ptq))
        raise ModelError(f"{file} has a {PTQ_KEY} record but no {QUANT_KEY} spec; run distqat ptq again")
    return Folder(name, path, Kind.BASE, cfg)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings off for the block (its verbosity restored after)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def saved_names(model: nn.Module, keys: set[str]) -> dict[str, str]:
    """{name in the saved files: state-dict key} for `keys`: save_pretrained writes a model whose checkpoints use
    other module names under those (Mixtral's `mlp` is saved as `block_sparse_moe`), our quantizer tensors with
    them, so they are looked up under the name the same renaming gives."""
    if revert_weight_conversion is None:  # a transformers without load-time renaming saves the names as they are
        return {k: k for k in keys}
    tracers = {k: torch.zeros(1) for k in keys}
    sources = {id(t): k for k, t in tracers.items()}
    renamed = revert_weight_conversion(model, dict(tracers))
    out = {new: sources[id(t)] for new, t in renamed.items() if id(t) in sources}
    return out if len(out) == len(keys) else {**{k: k for k in keys}, **out}


def load_fake_quant(folder: Folder, dtype: Optional[torch.dtype] = None, **kwargs: Any) -> nn.Module:
    """A QAT or PTQ folder as saved: base weights, the same surgery, its quantizer tensors (eval mode)."""
    if folder.kind not in (Kind.QAT, Kind.PTQ):
        raise ModelError(f"{folder.path} is a {folder.kind.value} folder, not a fake-quantized (QAT/PTQ) one")
    check_remote_code(folder.path, kwargs.get("trust_remote_code", False))
    with quiet_transformers():  # its load report lists the quantizer tensors, which are read below
        model = AutoModelForCausalLM.from_pretrained(folder.path, dtype=dtype, local_files_only=True, **kwargs)
    delattr(model.config, QUANT_KEY)  # quantize_model refuses a model that already records a spec
    quantize_model(model, folder.spec)
    wanted = quantizer_keys(model)
    saved = saved_names(model, wanted)
    found: dict[str, torch.Tensor] = {}
    for f in sorted(folder.path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if k in saved:
                    found[saved[k]] = st.get_tensor(k)
    missing = sorted(wanted - set(found))
    if missing:
        raise ModelError(f"{folder.path} lacks quantizer tensors the spec needs, e.g. {missing[:3]}")
    model.load_state_dict(found, strict=False)
    model.eval()
    return model

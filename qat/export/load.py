"""`load_quantized(folder)`: a converted checkpoint as a model of IntLinear layers and an integer KV cache."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from .. import kv as kv_quant
from .. import online
from ..io.folders import Folder, inspect
from ..io.models import CACHE_KWARGS, cache_kwarg
from ..keys import EXPORT_KEY, HF_QUANT_KEY
from ..runtime.fp4 import Fp4Linear
from ..runtime.fp8 import Fp8Linear
from ..runtime.int_linear import IntLinear
from ..runtime.kv_cache import IntKVCache
from ..spec import FP4_FORMATS, TensorSpec
from .experts import checkpoint_names, experts_of, load_experts
from .format import READ_VERSIONS, FormatError, file_sha256, matches, spec_from_args
from .fp4 import fp4_scheme
from .fp8 import fp8_scheme
from .layers import load_compressed


def _checked_config(folder: Folder) -> dict[str, Any]:
    path, cfg = folder.path, folder.config
    q = cfg.get(HF_QUANT_KEY) or {}
    if q.get("quant_method") != "compressed-tensors":
        raise FormatError(f"{path}/config.json has no compressed-tensors quantization_config; "
                          "create one with: distqat convert <model folder> --out <folder>")
    if q.get("quantization_status", "compressed") != "compressed":
        raise FormatError(f"{path}: quantization_status={q.get('quantization_status')!r}; only compressed "
                          "checkpoints hold integer weights")
    return cfg


def verify_files(path: Path, cfg: dict[str, Any]) -> list[Path]:
    """The folder's weight files, each checked against the SHA-256 its conversion recorded; FormatError for a
    format version this distqat does not read, a missing, truncated or modified file."""
    meta = cfg.get(EXPORT_KEY) or {}
    if meta and meta.get("version") not in READ_VERSIONS:
        raise FormatError(f"{path} was written by format version {meta.get('version')}; this distqat reads "
                          f"versions {', '.join(map(str, READ_VERSIONS))}: convert the model again with it")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors weight files")
    digests = meta.get("sha256")
    if digests:
        missing = sorted(set(digests) - {f.name for f in files})
        if missing:
            raise FormatError(f"{path} lacks weight file(s) {missing}; the checkpoint is incomplete")
        for f in files:
            if f.name in digests and file_sha256(f) != digests[f.name]:
                raise FormatError(f"{f} does not match the checksum written at conversion: it was truncated or "
                                  "modified; convert the model again")
    return files


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except SafetensorError as e:
            raise FormatError(f"{f} is not a readable safetensors file ({e}); it is truncated or corrupt: "
                              "convert the model again") from None
    return out


LayerSpecs = dict[str, tuple[TensorSpec, Optional[TensorSpec]]]
_PROBE = nn.Linear(1, 1, bias=False)  # stands for one expert's projection when matching config targets (class Linear)


def _layer_specs(q: dict[str, Any], linears: dict[str, nn.Linear]) -> LayerSpecs:
    specs: LayerSpecs = {}
    ignore = q.get("ignore") or []
    for gname, group in (q.get("config_groups") or {}).items():
        if not group.get("weights"):
            raise FormatError(f"config group {gname} quantizes no weights; the integer runtime needs them")
        w = spec_from_args(group["weights"], "weight")
        a = group.get("input_activations")
        a = spec_from_args(a, "activation") if a else None
        if w.format == "fp8" or (a is not None and a.format == "fp8"):
            fp8_scheme(w, a, f"config group {gname}")  # refuses what Fp8Linear does not run
        elif w.format in FP4_FORMATS or (a is not None and a.format in FP4_FORMATS):
            fp4_scheme(w, a, f"config group {gname}")  # refuses what Fp4Linear does not run
        elif a is not None and (a.bits not in (4, 8) or a.granularity != "token" or not a.dynamic):
            raise FormatError(f"config group {gname}: activations {a.bits}-bit {a.granularity} "
                              f"{'dynamic' if a.dynamic else 'static'} have no kernel; the runtime runs "
                              "dynamic per-token int8 or int4 activations")
        for name, mod in linears.items():
            if name in specs or any(matches(t, name, type(mod).__name__) for t in ignore):
                continue
            if any(matches(t, name, type(mod).__name__) for t in group.get("targets", [])):
                specs[name] = (w, a)
    return specs


def load_quantized(
    path: Union[str, Path, Folder], device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None, int_kv_cache: bool = True,
) -> nn.Module:
    """Build the model of a converted folder with IntLinear layers (integer weights kept packed), in the
    dtype it was converted in unless `dtype`.

    The KV cache settings are applied as in training: K/V are quantized in attention, and `generate`
    stores them in an IntKVCache (int8 or packed int4 codes) unless `int_kv_cache=False`.
    """
    folder = path if isinstance(path, Folder) else inspect(path, what="the converted folder")
    path = folder.path
    cfg = _checked_config(folder)
    files = verify_files(path, cfg)
    q = cfg[HF_QUANT_KEY]
    meta = cfg.get(EXPORT_KEY) or {}
    clean = {k: v for k, v in cfg.items() if k not in (HF_QUANT_KEY, EXPORT_KEY)}
    config = AutoConfig.for_model(**clean)
    if dtype is None:
        dtype = folder.dtype
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    # A MoE model's folder names its tensors as the family's original checkpoints do (qat.export.experts).
    fused_only = (meta.get("experts") or {}).get("names") == "fused"
    names = checkpoint_names(model, fused_only) if experts_of(model) else None
    ck = names.module if names is not None else (lambda n: n)
    pieces = {x.name: _PROBE for xs in (names.experts.values() if names is not None else ())
              for entries in xs.values() for x in entries}
    found = _layer_specs(q, {**{ck(n): m for n, m in linears.items()}, **pieces})
    specs = {n: found[ck(n)] for n in linears if ck(n) in found}
    if not specs and not any(k in pieces for k in found):
        raise FormatError(f"{path}: no linear layer of {type(model).__name__} matches the config's targets")
    tensors = _read_tensors(files)
    for name, (w, a) in specs.items():
        lin = linears[name]
        cls = Fp8Linear if w.format == "fp8" else Fp4Linear if w.format in FP4_FORMATS else IntLinear
        mod = cls(lin.in_features, lin.out_features, w, a, bias=lin.bias is not None, dtype=dtype)
        prefix = ck(name) + "."
        load_compressed(mod, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, ck(name))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, mod)
    used, filled = load_experts(model, names, {k: v for k, v in found.items() if k in pieces}, tensors, dtype) \
        if names is not None else (set(), set())
    model_key = {v: k for k, v in names.keys.items()} if names is not None else {}
    dense = {ck(n) for n in specs}
    rest = {model_key.get(k, k): v for k, v in tensors.items() if k.rpartition(".")[0] not in dense and k not in used}
    result = model.load_state_dict(rest, strict=False)
    owned = {f"{n}.{b}" for n in specs for b in ("qweight", "scale", "zero", "bias", "offset", "global_scale")}
    owned |= filled
    missing = [k for k in result.missing_keys if k not in owned
               and not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or result.unexpected_keys:
        raise FormatError(f"{path}: weights do not fit {type(model).__name__}: missing {missing[:4]}, "
                          f"unexpected {result.unexpected_keys[:4]}; the checkpoint is incomplete or for "
                          "another architecture")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()

    # The online rotations (R4 on down_proj inputs, R3 on queries and keys) the folder's rotation record names:
    # IntLinear reads the turned input as the QuantLinear it came from did, and the integer cache stores turned keys.
    online.reinstall(model)
    kv = _kv_spec(q, meta)
    if kv is not None:
        kv_quant.install(model, kv)
        if int_kv_cache:
            _use_int_cache(model, kv)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _kv_spec(q: dict[str, Any], meta: dict[str, Any]) -> Optional[TensorSpec]:
    """The KV cache spec: distqat_export.kv (format 3), or the kv_cache_scheme older versions wrote."""
    if meta.get("version", 1) >= 3:
        return TensorSpec(**meta["kv"]).check("kv") if meta.get("kv") else None
    args = q.get("kv_cache_scheme")
    if not args:
        return None
    kv = spec_from_args(args, "kv")
    kv.granularity = meta.get("kv_granularity") or kv.granularity
    return kv.check("kv")


def _use_int_cache(model: nn.Module, kv: TensorSpec) -> None:
    """Make `model.generate` store its cache as integers unless the caller passes its own cache (under the
    argument name of the installed transformers, `cache`, or the older `past_key_values`)."""
    n_layers = model.config.get_text_config().num_hidden_layers
    turn = online.key_rotation(model)
    generate = model.generate
    name = cache_kwarg(model)

    @functools.wraps(generate)
    def generate_with_int_cache(*args: Any, **kwargs: Any):
        given = any(kwargs.get(k) is not None for k in CACHE_KWARGS)
        if not given and kwargs.get("use_cache", True):
            kwargs[name] = IntKVCache(kv, n_layers, key_rotation=turn)
        return generate(*args, **kwargs)

    model.generate = generate_with_int_cache
    model.kv_spec = kv

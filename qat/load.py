"""`load(path)`: any folder distqat reads or writes, as a model ready to run.

It sits above PTQ and export because it dispatches to them: the kind comes from `qat.io.folders.inspect`,
base and fake-quant (QAT, PTQ) models load there, LLM.int8() models are restored by `qat.ptq.llm_int8`,
integer checkpoints load in `qat.export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .export import load_quantized
from .io.folders import Folder, Kind, inspect, load_fake_quant
from .io.models import load_model, resolve_dtype
from .ptq import llm_int8
from .ptq.aqlm_folder import load_aqlm

__all__ = ["Folder", "Kind", "inspect", "load"]


def load(
    name_or_path: Union[str, Path, Folder], dtype: Union[str, torch.dtype, None] = None,
    device: Union[str, torch.device, None] = None, attn_implementation: Optional[str] = "sdpa",
    trust_remote_code: bool = False,
) -> nn.Module:
    """The model of a base, QAT, PTQ, LLM.int8() or integer folder (or a bundled: name), in eval mode.

    dtype: None loads the dtype the folder was saved in; "auto" (the config's default) is bf16 on a GPU and
    fp32 on CPU, except for integer checkpoints, whose scales are exact in their saved dtype and keep it.
    """
    folder = name_or_path if isinstance(name_or_path, Folder) else inspect(name_or_path)
    if folder.kind is Kind.INT:
        return load_quantized(folder, device=device, dtype=None if dtype == "auto" else resolve_dtype(dtype))
    kwargs = {"attn_implementation": attn_implementation, "trust_remote_code": trust_remote_code}
    torch_dtype = resolve_dtype(dtype)
    if folder.kind is Kind.BASE:
        model = load_model(folder.path, torch_dtype, **kwargs)
    elif folder.kind is Kind.AQLM:
        model = load_aqlm(folder.path, folder.record, torch_dtype, **kwargs)
    elif folder.kind is Kind.LLM_INT8:
        model = llm_int8.restore(load_model(folder.path, torch_dtype, **kwargs), folder.record)
    else:
        model = load_fake_quant(folder, torch_dtype, **kwargs)
    return model.to(device) if device is not None else model

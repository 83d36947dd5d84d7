"""`load(path)`: any folder distqat reads or writes, as a model ready to run.

The kind comes from `qat.io.folders.inspect`; base and fake-quant (QAT, PTQ) models load there. The other kinds
hold `qat.runtime` layers, but each is read by the code that defines its format: integer checkpoints by
`qat.export`, AQLM folders by `qat.ptq.aqlm_folder`, LLM.int8() models by `qat.ptq.llm_int8`. So this module is a
layer of its own just above PTQ and export (the lowest that can reach all three), and below `qat.qlora`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import online
from .export import load_quantized
from .export.foreign import load_foreign
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
    """The model of a base, QAT, PTQ, LLM.int8(), integer or foreign (GPTQ, AWQ, compressed-tensors) folder (or a
    bundled: name), in eval mode.

    dtype: None loads the dtype the folder was saved in; "auto" (the config's default) is bf16 on a GPU and
    fp32 on CPU, except for integer and foreign checkpoints, whose scales are exact in their saved dtype and keep it.
    """
    folder = name_or_path if isinstance(name_or_path, Folder) else inspect(name_or_path)
    if folder.kind is Kind.INT:
        return load_quantized(folder, device=device, dtype=None if dtype == "auto" else resolve_dtype(dtype))
    if folder.kind is Kind.FOREIGN:  # GPTQ, AWQ, compressed-tensors: their codes as stored, scales exact
        return load_foreign(folder, dtype=None if dtype == "auto" else resolve_dtype(dtype), device=device)
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
    online.reinstall(model)  # the rotation record's online Hadamards (a fake-quant load has them from quantize_model)
    return model.to(device) if device is not None else model

"""How a config setting is declared: its default, its help text, and its allowed values or range, once.

Every section of the run config (`trainer/schema.py` and the sections the lower layers own: `quant`, `ptq`,
`generate`, `lora`) declares its keys with `setting`, so the loader's checks (`trainer/config.py`) and the
`--help` listing read the same field metadata. It imports nothing heavy: importing a schema must not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, field
from typing import Any, Optional


def setting(default: Any = MISSING, *, help: str, choices: Optional[tuple] = None,
            range: Optional[tuple[float, float]] = None, factory: Optional[Callable[[], Any]] = None,
            group: Optional[str] = None) -> Any:
    """A dataclass field carrying its help text, and its allowed values (`choices`) or closed `range`.

    `factory` builds a mutable default (a list, a section). `group` names a part of a section that a command can
    read without the rest (e.g. data's "text": the path and field the PTQ calibration and eval read)."""
    if not help or not help.strip():
        raise ValueError("a setting needs its help text")
    metadata: dict[str, Any] = {"help": " ".join(help.split())}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if range is not None:
        metadata["range"] = tuple(range)
    if group is not None:
        metadata["group"] = group
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# Names the schema offers whose implementations live in heavy modules, which import them from here:
# train.speedups' (qat/fast.py applies them).
SPEEDUPS = ("norm_quant", "weight_batch", "kv_direct")


def help_of(f: Field) -> str:
    """The help text a setting declared ('' for a field declared without `setting`)."""
    return f.metadata.get("help", "")


__all__ = ["SPEEDUPS", "setting", "help_of"]

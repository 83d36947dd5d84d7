"""A PTQ run stopped by a stop signal keeps its finished blocks: GPTQ on a large model takes hours, and a preempted
job should not redo them.

At a block boundary after the signal, the finished blocks' state (their quantized weights and frozen quantizers,
and whatever a transform folded into them) and the next block's calibration inputs are written whole to one file;
the rerun with the same model, spec, method settings and calibration ids loads them, skips those blocks and goes on,
ending with the folder an uninterrupted run writes. Anything else that differs starts afresh. The file is read with
`torch.load(weights_only=True)`: tensors and plain containers only.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..io.atomic import atomic_file

PROGRESS_FILE = "blocks.pt"


def fingerprint(model: nn.Module, spec: Any, cfg: Any, calib_ids: Optional[torch.Tensor],
                first_layer: nn.Module) -> str:
    """What makes a run's blocks the same: the model (its config and its first block's weights, before any
    transform), the spec, the PTQ settings (but whether progress is printed) and the calibration ids."""
    h = hashlib.sha256()
    settings = asdict(cfg) if is_dataclass(cfg) else dict(vars(cfg))
    settings.pop("progress", None)
    record = {"config": model.config.to_dict(), "spec": spec.to_dict(), "ptq": settings}
    h.update(json.dumps(record, sort_keys=True, default=str).encode())
    for name, t in sorted(first_layer.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    if calib_ids is not None:
        h.update(calib_ids.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class BlockProgress:
    """The progress file of one PTQ output folder (`folder`/blocks.pt), for the run whose fingerprint is `key`."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = Path(folder), key
        self.path = self.folder / PROGRESS_FILE

    def save(self, done: list[nn.Module], inputs: Optional[list[torch.Tensor]], report: dict) -> None:
        state = {
            "key": self.key,
            "blocks": [{k: v.detach().cpu() for k, v in layer.state_dict().items()} for layer in done],
            "inputs": None if inputs is None else [x.detach().cpu() for x in inputs],
            "report": json.dumps(report),
        }
        # Serialized in memory, then written by Python: torch.save's own writer reports a full disk as a RuntimeError
        # ("unexpected pos ..."), which would end the command as a bug; an OSError is the one-line DiskFull.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getbuffer()
        try:
            with atomic_file(self.path, need=data.nbytes) as tmp, open(tmp, "wb") as f:
                f.write(data)
        except BaseException:
            try:
                self.folder.rmdir()  # made for this file: gone again unless an earlier run's progress is there
            except OSError:
                pass
            raise

    def load(self) -> Optional[dict[str, Any]]:
        """The saved progress of this same run, or None (none saved, another run's, or unreadable: start afresh)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a file we cannot read is no progress: the run starts afresh
            return None
        if state.get("key") != self.key:
            return None
        state["report"] = json.loads(state["report"])
        return state

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass

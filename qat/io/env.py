"""Where this process stands: the cache home, and its rank in a multi-process run."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist


def distqat_home() -> Path:
    """The cache root (bundled model and text, packed data): `$DISTQAT_HOME`, default `~/.cache/distqat`."""
    return Path(os.environ.get("DISTQAT_HOME", "~/.cache/distqat")).expanduser()


def rank_world() -> tuple[int, int]:
    """(rank, world size): the initialized process group's, else torchrun/launch.sh/SLURM variables', else (0, 1).

    The variables count before any process group exists, e.g. for `generate`, which needs no collectives.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    return rank, world

"""Where this process stands: the cache home, its rank in a multi-process run, and what it runs on (the package
versions and device a result records)."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch
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


def end_process_group() -> None:
    """Destroy this process's group, if it has one, before the interpreter exits: left to interpreter shutdown, a
    gloo group aborted a finished 2-process ZeRO-3 run ("terminate called without an active exception", exit 134)
    in 1 of 12 tries, after its results were written."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# The packages whose versions change a result: the numerics (torch), the model code (transformers), the training
# stack, the data loaders, and the readers and harness an eval goes through. Distribution names, as pip knows them.
RECORDED = ("torch", "transformers", "lightning", "deepspeed", "datasets", "peft", "compressed-tensors", "lm_eval",
            "distqat")


def versions() -> dict[str, str]:
    """{name: version} of python and of each RECORDED package that is installed (the missing ones left out);
    names with "_" for "-" so they read as JSON keys (compressed_tensors)."""
    found = {"python": platform.python_version()}
    for name in RECORDED:
        try:
            found[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def device_name() -> str:
    """What this process computes on, in a few words: "cuda: NVIDIA H200" or "cpu (2 threads)"."""
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu ({torch.get_num_threads()} threads)"

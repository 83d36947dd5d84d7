"""Where this process sits in a training run, read from its launcher's variables: torchrun's (launch.sh on one node
or several), SLURM's (launch.sh's srun inside an allocation) or neither (one process, or Lightning's own launcher).

Lightning reads the same variables (TorchElasticEnvironment first, then SLURMEnvironment) and refuses, or waits for
ranks that never come, when the devices x num_nodes it is given disagree with them; the layout here gives it the
numbers they imply.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Optional

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment

TORCHRUN, SLURM, ONE = "torchrun", "SLURM", "one process"


@dataclass(frozen=True)
class Layout:
    """This process's place: its rank of `world`, its node and rank there, and the run's shape (`devices`
    processes on each of `num_nodes` nodes), as `launcher` started it."""

    launcher: str
    rank: int
    world: int
    node: int
    local_rank: int
    devices: int
    num_nodes: int

    def line(self) -> str:
        return f"rank {self.rank} of {self.world} (node {self.node}, local rank {self.local_rank}; {self.launcher})"


def tasks_per_node(text: str) -> list[int]:
    """SLURM's compressed list of tasks per node, node by node: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE={text!r} is not SLURM's form (e.g. 2(x3),1); run under srun as "
                             "sbatch/salloc set it, or set SLURM_NTASKS_PER_NODE")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def _slurm(env: Mapping[str, str], devices: Optional[int]) -> Layout:
    ntasks = int(env["SLURM_NTASKS"])
    nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    if ntasks > 1 and "SLURM_STEP_ID" not in env:
        raise ValueError(f"this SLURM allocation has {ntasks} tasks but this process is not one of them (no "
                         "SLURM_STEP_ID): start it with ./launch.sh, which runs srun, or with srun")
    if "SLURM_NTASKS_PER_NODE" in env:
        per_node = [int(env["SLURM_NTASKS_PER_NODE"])] * nnodes
    elif "SLURM_STEP_TASKS_PER_NODE" in env or "SLURM_TASKS_PER_NODE" in env:
        per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "")))
    else:
        per_node = [ntasks // nnodes] * nnodes
    if len(set(per_node)) != 1 or per_node[0] * nnodes != ntasks:
        raise ValueError(f"SLURM placed {ntasks} tasks on {nnodes} node(s) as {per_node}; training needs the same "
                         "number on each node: ask for --ntasks-per-node=<processes per node> with --nodes")
    if devices is not None and devices != per_node[0]:
        raise ValueError(f"{devices} devices asked for, but SLURM runs {per_node[0]} tasks per node; ask SLURM for "
                         f"--ntasks-per-node={devices}")
    return Layout(SLURM, int(env.get("SLURM_PROCID", "0")), ntasks, int(env.get("SLURM_NODEID", "0")),
                  int(env.get("SLURM_LOCALID", "0")), per_node[0], nnodes)


def cluster_layout(devices: Optional[int] = None, env: Optional[Mapping[str, str]] = None) -> Layout:
    """This process's layout from `env` (default: os.environ); `devices` (processes per node) overrides what
    torchrun or the machine says and must match SLURM's. torchrun's variables come first, as in Lightning: a
    torchrun inside a one-task SLURM allocation sees both."""
    env = os.environ if env is None else env
    if env.get("TORCHELASTIC_RUN_ID"):
        world = int(env["WORLD_SIZE"])
        per_node = devices or int(env["LOCAL_WORLD_SIZE"])
        return Layout(TORCHRUN, int(env["RANK"]), world, int(env.get("GROUP_RANK", "0")), int(env["LOCAL_RANK"]),
                      per_node, max(1, world // per_node))
    if "SLURM_NTASKS" in env:
        return _slurm(env, devices)
    # Neither: one process; on several GPUs Lightning starts the others itself (they carry LOCAL_RANK, NODE_RANK).
    per_node = devices or int(env.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
    world = int(env.get("WORLD_SIZE", per_node))
    node, local = int(env.get("NODE_RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    return Layout(ONE if world == 1 else "Lightning", int(env.get("RANK", node * per_node + local)), world, node,
                  local, per_node, max(1, world // max(per_node, 1)))


def join_run(layout: Layout, env: Optional[MutableMapping[str, str]] = None, command: str = "train") -> None:
    """Under SLURM, the variables torchrun would have set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), which
    the code before Lightning's reads, and SLURM_NTASKS_PER_NODE, without which Lightning's SLURMEnvironment
    refuses an allocation asked for with --ntasks; then this rank's one line on stderr."""
    env = os.environ if env is None else env
    if layout.launcher == SLURM:
        # SLURM's numbers, over any a job script left behind (its RANK is no task's)
        env.update(RANK=str(layout.rank), WORLD_SIZE=str(layout.world), LOCAL_RANK=str(layout.local_rank),
                   LOCAL_WORLD_SIZE=str(layout.devices), SLURM_NTASKS_PER_NODE=str(layout.devices))
    # One write (print makes two, the line and its newline): the ranks share one stderr, and unbuffered
    # (PYTHONUNBUFFERED) two ranks' writes would interleave mid-line.
    sys.stderr.write(f"distqat {command}: {layout.line()}\n")
    sys.stderr.flush()


def cluster_plugins(layout: Layout) -> list:
    """Lightning's plugins for this layout: under SLURM its environment without auto-requeue (distqat stops on the
    signals itself, and Lightning's requeue would call scontrol from inside the job); none otherwise."""
    if layout.launcher == SLURM:
        return [SLURMEnvironment(auto_requeue=False)]
    return []

"""launch.sh's distributed paths on this one machine: two nodes over loopback (torchrun, one process each) and a SLURM
allocation (tests/scripts/srun standing in for srun) train to the same weights as one node with two processes;
each process says which rank it is; the ranks' exit code comes through launch.sh, and signals go on to them."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import PUBLISHED
from helpers.models import tiny_run_dir
from safetensors.torch import load_file

from trainer.cluster import ONE, SLURM, TORCHRUN, Layout, cluster_layout, join_run, tasks_per_node

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "scripts"
# Not anchored to a line's start: another rank's print (two writes when unbuffered) may have split a line before it.
RANK_LINE = re.compile(r"distqat train: rank (\d+) of (\d+) \(node (\d+), local rank (\d+); ([^)]+)\)\n")
# What a launcher or scheduler around the test run may have set; each run here sets its own.
LAUNCH_VARS = re.compile(r"^(SLURM_\w+|SLURMD_\w+|PET_\w+|TORCHELASTIC_\w+|TORCH_ELASTIC_\w+|MASTER_ADDR|MASTER_PORT|"
                         r"RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|GROUP_RANK|NODE_RANK|NNODES|NPROC_PER_NODE|"
                         r"DISTQAT_EXIT_DIR)$")


def launch_env(tmp: Path, **extra: str) -> dict[str, str]:
    """launch.sh's environment: this interpreter's (launch.sh then uses it as the active virtualenv, installed
    already: its stamp), this checkout first on the path, one thread per process, a temp folder to look in."""
    env = {k: v for k, v in os.environ.items() if not LAUNCH_VARS.match(k)}
    (tmp / "tmp").mkdir(exist_ok=True)
    env.update(VIRTUAL_ENV=sys.prefix, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp / "tmp"), **extra)
    return env


def free_port(low: int = 0, high: int = 0) -> int:
    """A port free now: any (the system's pick), or one in [low, high]."""
    for _ in range(200):
        port = random.randint(low, high) if low else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {low}-{high}")


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["bash", str(ROOT / "launch.sh"), "train", PUBLISHED, f"model.name_or_path={root / 'teacher'}",
            f"data.path={root / 'corpus.txt'}", "data.seq_len=32", "train.max_steps=3", "train.save_every=100",
            "train.val_every=1000", "train.micro_batch_size=2", "data.val_fraction=0.05", "distributed.strategy=ddp",
            f"output_dir={out}", *extra]


def rank_lines(text: str) -> list[tuple]:
    """Each rank line's (rank, world, node, local rank, launcher), in rank order."""
    return sorted((int(r), int(w), int(n), int(lr), how) for r, w, n, lr, how in RANK_LINE.findall(text))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled_tokenizer):
    return tiny_run_dir(tmp_path_factory.mktemp("launch"), bundled_tokenizer)


@pytest.fixture(scope="module")
def one_node_two_processes(run_dir):
    """The reference: `NPROC_PER_NODE=2 ./launch.sh train` (torchrun, one node)."""
    out = run_dir / "one_node"
    env = launch_env(run_dir, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    r = subprocess.run(train_args(run_dir, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert rank_lines(r.stderr) == [(0, 2, 0, 0, TORCHRUN), (1, 2, 0, 1, TORCHRUN)]
    assert not list((run_dir / "tmp").glob("*distqat-exit*")), "launch.sh removes its exit-code folder"
    return weights(out)


def test_two_nodes_over_loopback_train_as_one_node_with_two_processes(run_dir, one_node_two_processes, tmp_path):
    out, port = tmp_path / "two_nodes", str(free_port())
    nodes = [subprocess.Popen(train_args(run_dir, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=launch_env(tmp_path, NNODES="2", NODE_RANK=str(n), MASTER_ADDR="127.0.0.1",
                                                        MASTER_PORT=port))
             for n in (0, 1)]
    errs = [p.communicate(timeout=600)[1] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert "torchrun: 2 node(s) x 1 process(es), node rank 1" in errs[1]
    assert rank_lines(errs[0]) == [(0, 2, 0, 0, TORCHRUN)] and rank_lines(errs[1]) == [(1, 2, 1, 0, TORCHRUN)]
    assert_same_weights(weights(out), one_node_two_processes)


def test_slurm_allocation_runs_one_process_per_task_through_srun(run_dir, one_node_two_processes, tmp_path):
    """sbatch --nodes=2 --ntasks=2 as it sets the batch script's variables (no --ntasks-per-node, so no
    SLURM_NTASKS_PER_NODE, which Lightning asks for: distqat derives it); Lightning takes the address from the node
    list and the port from the job id, as on a cluster."""
    port = free_port(15000, 24999)
    env = launch_env(tmp_path, SLURM_JOB_ID=f"7{port - 15000:04d}", SLURM_JOB_NAME="qat", SLURM_NTASKS="2",
                     SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_NODELIST="127.0.0.[1-2]",
                     SLURM_JOB_NODELIST="127.0.0.[1-2]", SLURM_TASKS_PER_NODE="1(x2)", SLURM_PROCID="0",
                     SLURM_LOCALID="0", SLURM_NODEID="0")
    env["PATH"] = f"{STANDIN}{os.pathsep}{env['PATH']}"
    out = tmp_path / "slurm"
    r = subprocess.run(train_args(run_dir, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"SLURM job {env['SLURM_JOB_ID']}: srun with 2 tasks on 2 node(s)" in r.stderr
    assert rank_lines(r.stderr) == [(0, 2, 0, 0, SLURM), (1, 2, 1, 0, SLURM)]
    assert_same_weights(weights(out), one_node_two_processes)
    assert not list(ROOT.glob(".distqat-exit.*")), "launch.sh removes its exit-code folder"


def test_bad_input_on_two_processes_exits_2_and_writes_nothing(run_dir, tmp_path):
    out = tmp_path / "bad"
    env = launch_env(tmp_path, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    r = subprocess.run(train_args(run_dir, out, "train.no_such_key=1"), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]  # torchrun itself says 1 for any failed worker
    assert "distqat train: error:" in r.stderr and "no_such_key" in r.stderr
    assert not out.exists() and not list((tmp_path / "tmp").glob("*distqat-exit*"))
    r = subprocess.run(train_args(run_dir, out), cwd=ROOT, env={**env, "NPROC_PER_NODE": "two"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "launch.sh: error: NPROC_PER_NODE=two is not a whole number above 0; set it to the number of processes on "
        "each node, or unset it")


# A stand-in for the ranks' launcher, cheap enough to try every case: it writes the rank codes $CODES names
# ("0:75 1:2") and exits with $STATUS, at once or, with $WAIT set, on the first signal it gets (named in $WAIT);
# without one, it gives up after 60 s (exit 99).
FAKE_SRUN = """#!/usr/bin/env bash
finish() {
  [[ -z "${WAIT:-}" ]] || echo "$1" > "$WAIT"
  for c in $CODES; do echo "${c#*:}" > "$DISTQAT_EXIT_DIR/rank${c%%:*}.code"; done
  exit "$STATUS"
}
for s in TERM USR1 USR2 HUP INT; do trap "finish $s" $s; done
[[ -n "${WAIT:-}" ]] || finish none
touch "$WAIT.ready"
for _ in $(seq 6000); do sleep 0.05; done
exit 99
"""


def fake_allocation(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = launch_env(tmp_path)
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", **extra}


@pytest.mark.parametrize("codes,status,expected", [
    ("0:0 1:0", 0, 0),
    ("0:75 1:75", 1, 75),  # stopped by a signal: a rerun continues
    ("0:75 1:2", 1, 2),  # rank 1's bad input; srun's TERM then stopped rank 0, which is no preemption
    ("0:76 1:1", 1, 1),  # rank 1 failed, rank 0 saw it die
    ("0:75 1:76", 1, 76),  # a rank died while they stopped
    ("0:0 1:2", 1, 2),
    ("0:130 1:130", 1, 130),  # ctrl-C
    ("", 137, 137),  # no rank got to write its code (killed outright): the launcher's status
])
def test_the_ranks_code_is_the_exit_code(tmp_path, codes, status, expected):
    env = fake_allocation(tmp_path, CODES=codes, STATUS=str(status))
    r = subprocess.run(["bash", str(ROOT / "launch.sh"), "train"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == expected, r.stderr[-2000:]


def default_signals() -> None:
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("name", ["TERM", "USR1", "USR2", "HUP", "INT"])
def test_signals_go_on_to_the_launcher(tmp_path, name):
    seen = tmp_path / "seen"
    env = fake_allocation(tmp_path, CODES="0:75 1:75", STATUS="1", WAIT=str(seen))
    # A shell cannot trap a signal it was started ignoring, and a job runner or a non-interactive parent shell
    # (nohup, `cmd &`) starts its children with HUP or INT ignored: start launch.sh as a terminal would
    p = subprocess.Popen(["bash", str(ROOT / "launch.sh"), "train"], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                         text=True, preexec_fn=default_signals)
    # launch.sh starts Python before srun: on a loaded machine that can take minutes, and a signal sent before its
    # traps are set would end it outright
    deadline = time.monotonic() + 600
    while not Path(f"{seen}.ready").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Path(f"{seen}.ready").exists(), f"the stand-in srun never started: {p.poll()=}"
    p.send_signal(getattr(signal, f"SIG{name}"))
    err = p.communicate(timeout=300)[1]
    assert seen.read_text().strip() == name
    assert p.returncode == 75, err[-2000:]
    assert not list(ROOT.glob(".distqat-exit.*")) and not list((tmp_path / "tmp").glob("*distqat-exit*"))


TORCHRUN_ENV = {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "GROUP_RANK": "1"}


def test_layout_from_torchrun_slurm_or_neither():
    assert cluster_layout(env=TORCHRUN_ENV) == Layout(TORCHRUN, 3, 4, 1, 1, 2, 2)
    # torchrun inside a one-task SLURM allocation: torchrun's variables count, as for Lightning
    assert cluster_layout(env={**TORCHRUN_ENV, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).launcher == TORCHRUN
    slurm = {"SLURM_NTASKS": "6", "SLURM_NNODES": "3", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "2"}
    want = Layout(SLURM, 5, 6, 2, 1, 2, 3)
    assert cluster_layout(env={**slurm, "SLURM_NTASKS_PER_NODE": "2"}) == want
    assert cluster_layout(env={**slurm, "SLURM_TASKS_PER_NODE": "2(x3)"}) == want
    assert cluster_layout(env={**slurm, "SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURM_TASKS_PER_NODE": "4,1,1"}) == want
    assert cluster_layout(env=slurm) == want
    assert cluster_layout(env={"SLURM_NTASKS": "1", "SLURM_JOB_ID": "5"}) == Layout(SLURM, 0, 1, 0, 0, 1, 1)
    assert cluster_layout(devices=1, env={}) == Layout(ONE, 0, 1, 0, 0, 1, 1)
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1] and tasks_per_node("4") == [4]


def test_layouts_lightning_cannot_run_are_refused_in_one_line():
    slurm = {"SLURM_NTASKS": "3", "SLURM_NNODES": "2", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}
    with pytest.raises(ValueError, match=r"placed 3 tasks on 2 node\(s\) as \[2, 1\]; .*--ntasks-per-node"):
        cluster_layout(env={**slurm, "SLURM_TASKS_PER_NODE": "2,1"})
    with pytest.raises(ValueError, match="not one of them .* start it with ./launch.sh"):
        cluster_layout(env={"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})
    with pytest.raises(ValueError, match="is not SLURM's form"):
        tasks_per_node("2(3)")
    with pytest.raises(ValueError, match="--ntasks-per-node=4"):
        cluster_layout(devices=4, env={**slurm, "SLURM_NTASKS": "2", "SLURM_NNODES": "1"})


def test_under_slurm_the_torchrun_variables_are_filled_in(capsys):
    env = {"RANK": "0"}  # left over from the batch script: SLURM's numbers count
    join_run(Layout(SLURM, 5, 6, 2, 1, 2, 3), env)
    assert env == {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                   "SLURM_NTASKS_PER_NODE": "2"}
    assert capsys.readouterr().err == "distqat train: rank 5 of 6 (node 2, local rank 1; SLURM)\n"
    env = {}
    join_run(Layout(TORCHRUN, 0, 2, 0, 0, 2, 1), env)
    assert env == {}

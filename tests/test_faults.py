"""Cluster faults on real `distqat train` runs of a tiny teacher, each followed by the rerun a user makes: a stop
signal (SLURM's USR1, TERM) checkpoints and exits 75; a full disk at a checkpoint keeps the ones before; a rank killed
ends the other within peer_timeout_s, naming it (exit 76); under ZeRO (2 processes, gloo) the checkpoint folder
appears whole. Every rerun ends with the uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import os
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

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 12


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, bundled_tokenizer):
    return tiny_run_dir(tmp_path_factory.mktemp("faults"), bundled_tokenizer)


def train_args(dirs: Path, out: Path, *extra: str) -> list[str]:
    return ["train", PUBLISHED, f"model.name_or_path={dirs / 'teacher'}", f"data.path={dirs / 'corpus.txt'}",
            "data.seq_len=32", f"train.max_steps={STEPS}", "train.save_every=3", "train.keep_last=10",
            "train.val_every=1000", "train.lr=3e-4", "train.warmup_steps=2", "train.micro_batch_size=2",
            "data.val_fraction=0.05", "train.progress_every_s=0", f"output_dir={out}", *extra]


def start(args: list[str], env: dict | None = None, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *prefix, "-m", "trainer", *args], cwd=ROOT, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"ended before {path.name} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def no_temps(out: Path) -> None:
    left = [p for p in out.rglob(".*") if "tmp" in p.name or p.name.count(".") >= 2 and p.parent.name == "checkpoints"]
    assert not left, left


@pytest.fixture(scope="module")
def single_ref(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "ref"
    code, err = finish(start(train_args(dirs, out, "distributed.strategy=single")))
    assert code == 0, err[-3000:]
    return out


FULL_DISK_AT = """
import errno, sys
import trainer.strategy as s
real = open
def fake(path, mode="r", *a, **k):
    f = real(path, mode, *a, **k)
    if f"step={sys.argv[1]}." in str(path) and "w" in mode:
        def write(data):
            f.__class__.write(f, bytes(data)[:4096])
            raise OSError(errno.ENOSPC, "No space left on device")
        return type("Full", (), {"write": staticmethod(write), "__enter__": lambda self: self,
                                 "__exit__": lambda self, *e: f.close()})()
    return f
s.open = fake
from trainer.cli import main
sys.exit(main(sys.argv[2:]))
"""


def stopped_step(err: str) -> int:
    return int(err.strip().splitlines()[-1].split("(step ")[1].split(")")[0])


def next_save(step: int) -> int:
    return (step // 3 + 1) * 3


def test_usr1_mid_train_checkpoints_exits_75_and_a_full_disk_later_keeps_it_and_reruns_end_bit_exact(dirs, single_ref,
                                                                                                      tmp_path):
    out = tmp_path / "stopped"
    args = train_args(dirs, out, "distributed.strategy=single")
    p = start(args)
    wait_for(out / "checkpoints" / "step=3.ckpt", p)
    p.send_signal(signal.SIGUSR1)  # SLURM's --signal=USR1@120
    code, err = finish(p)
    assert code == 75, err[-3000:]
    step = stopped_step(err)
    assert 3 <= step < STEPS - 3
    assert err.strip().splitlines()[-1] == (
        f"distqat train: stopped by SIGUSR1; checkpoint {out}/checkpoints/step={step}.ckpt (step {step}) written; "
        "the same command continues from it (train.resume=auto) (exit 75)")
    assert (out / "checkpoints" / f"step={step}.ckpt").is_file() and not (out / "model").exists()
    assert not (out / ".distqat.lock").exists()
    no_temps(out)

    # The rerun continues from that checkpoint, and the disk fills while it writes the next one.
    full = next_save(step)
    r = subprocess.run([sys.executable, "-c", FULL_DISK_AT, str(full), *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {out}/checkpoints/step={step}.ckpt" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"distqat train: error: {out}/checkpoints/step={full}.ckpt: no space left on the device (")
    assert "needed" in last and "free); free space or write elsewhere; nothing was left half-written" in last
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == sorted({"step=3.ckpt", f"step={step}.ckpt"}), kept

    code, err = finish(start(args))
    assert code == 0, err[-3000:]
    assert f"Restoring states from the checkpoint path at {out}/checkpoints/step={step}.ckpt" in err
    assert_same_weights(single_ref, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(dirs: Path, out: Path, *extra: str) -> list[subprocess.Popen]:
    """Two ranks started as srun starts tasks (no agent above them): the environment names each one's place."""
    port = _free_port()
    procs = []
    for r in (0, 1):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r), "LOCAL_RANK": str(r),
               "NODE_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(start(train_args(dirs, out, "distributed.strategy=deepspeed", *extra), env=env))
    return procs


@pytest.fixture(scope="module")
def ds_ref(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "ref"
    for p in two_ranks(dirs, out):
        code, err = finish(p)
        assert code == 0, err[-3000:]
    return out


def test_two_ranks_under_zero_a_stop_to_one_then_a_killed_rank_and_the_reruns_end_bit_exact(dirs, ds_ref, tmp_path):
    out = tmp_path / "run"
    procs = two_ranks(dirs, out)
    wait_for(out / "checkpoints" / "step=3.ckpt", procs[0])
    assert (out / "checkpoints" / "step=3.ckpt" / "checkpoint").is_dir()  # the folder appears whole, by a rename
    procs[0].send_signal(signal.SIGTERM)  # Kubernetes' stop, to one process only: the ranks agree on the step
    ends = [finish(p) for p in procs]
    assert [c for c, _ in ends] == [75, 75], [e[-2000:] for _, e in ends]
    lines = [e.strip().splitlines()[-1] for _, e in ends]
    assert lines[0] == lines[1] and lines[0].startswith("distqat train: stopped by SIGTERM; checkpoint ")
    step = stopped_step(ends[0][1])
    assert (out / "checkpoints" / f"step={step}.ckpt" / "checkpoint").is_dir() and not (out / "model").exists()
    no_temps(out)

    # The rerun continues; once it has written its next checkpoint, rank 1 dies (an OOM kill, a lost node).
    timeout = 8  # a live rank's beat must not miss it on 2 shared cores, under two test workers
    procs = two_ranks(dirs, out, f"distributed.peer_timeout_s={timeout}")
    wait_for(out / "checkpoints" / f"step={next_save(step)}.ckpt", procs[0])
    procs[1].kill()
    t0 = time.monotonic()
    code, err = finish(procs[0], timeout=120)
    waited = time.monotonic() - t0
    procs[1].wait()
    assert code == 76, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"distqat train: error: rank 1 of 2 is gone: no heartbeat for {timeout} s (killed, out of memory, or its node "
        "lost); rank 0 stops too (exit 76); rerun the same command to continue from the last checkpoint "
        "(train.resume=auto)")
    assert waited < timeout + 30, waited  # the watch's timeout, not the collective's 1800 s
    assert not (out / "model").exists()

    for p in two_ranks(dirs, out):
        code, err = finish(p)
        assert code == 0, err[-3000:]
    assert_same_weights(ds_ref, out)

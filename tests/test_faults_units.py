"""The pieces a cluster fault goes through, one at a time: the output-folder lock (a second run refused, a stale
lock taken over), the writers on a full disk (refused before writing, or stopped midway with the old file intact and
no temp left), the stop-signal context, the watch that names a dead rank, and the exit codes launch.sh reads."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import PUBLISHED

from qat.io import atomic
from qat.io.atomic import DiskFull, atomic_dir, atomic_file, clean_stale, ensure_space, write_json
from qat.io.lock import LOCK_FILE, FolderLock, FolderLocked
from qat.io.signals import EXIT_RANK_LOST, EXIT_STOPPED, Stopped, record_exit, signal_number, stop_on_signals
from trainer import strategy as strategy_module
from trainer.cli import main
from trainer.strategy import AtomicCheckpointIO
from trainer.watchdog import PREFIX, PeerWatch

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from qat.io.lock import FolderLock\n"
        "with FolderLock(sys.argv[1], 'distqat train'):\n"
        "    print('held', flush=True); time.sleep(60)\n")


def _holder(folder: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        lock = json.loads((out / LOCK_FILE).read_text())
        assert lock["pid"] == holder.pid and lock["host"] == socket.gethostname()
        with pytest.raises(FolderLocked, match=rf"in use by another run: distqat train \(pid {holder.pid} on "):
            FolderLock(out, "distqat eval").__enter__()
        # the command line: one line, exit 2, nothing written
        code = main(["eval", PUBLISHED, f"output_dir={out}", "model.name_or_path=/nonexistent"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"pid {holder.pid}" in err[0] and "choose another output" in err[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_whose_holder_died_is_taken_over_and_released_after(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    holder.kill()  # SIGKILL: the lock file stays, its pid is gone
    holder.wait()
    assert (out / LOCK_FILE).exists()
    with FolderLock(out, "distqat train"):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        with FolderLock(out, "distqat generate"):  # the pipeline's steps: the same process holds it
            pass
        assert (out / LOCK_FILE).exists()
    assert not (out / LOCK_FILE).exists()


def test_a_lock_from_another_host_is_stale_only_once_untouched_for_stale_s(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": "node-17", "pid": 1, "command": "distqat train"}))
    with pytest.raises(FolderLocked, match=r"on node-17.*if that run is gone, delete .*\.distqat\.lock"):
        FolderLock(out, "distqat train", stale_s=600).__enter__()
    old = time.time() - 700
    os.utime(out / LOCK_FILE, (old, old))
    with FolderLock(out, "distqat train", stale_s=600):
        assert json.loads((out / LOCK_FILE).read_text())["host"] == socket.gethostname()


def test_the_holder_keeps_its_lock_fresh_and_a_created_folder_goes_if_left_empty(tmp_path):
    out = tmp_path / "new"
    with FolderLock(out, "distqat ptq", beat_s=0.05) as lock:
        old = time.time() - 100
        os.utime(lock.path, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.path.stat().st_mtime < 50
    assert not out.exists()


def _full_disk_after(n_bytes: int):
    """A file object's write that stores n_bytes, then fails as a full disk does."""
    real_open = open

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" not in mode:
            return f
        write = f.write

        def limited(data):
            write(bytes(data)[:n_bytes] if "b" in mode else data[:n_bytes])
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write = limited
        return f
    return fake_open


def test_a_full_disk_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "eval.json"
    write_json(path, {"ppl": 1.0})
    monkeypatch.setattr(atomic.Path, "write_text",
                        lambda self, text: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFull, match=r"eval\.json: no space left on the device .*free\); free space or write "
                                       r"elsewhere; the eval\.json already there is unchanged"):
        write_json(path, {"ppl": 2.0})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"ppl": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_a_full_disk_in_a_folder_write_keeps_the_old_folder(tmp_path):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "a.bin").write_bytes(b"old")
    with pytest.raises(DiskFull, match=r"model: no space left .*5 B written when it ran out.*already there is "
                                       r"unchanged"):
        with atomic_dir(final) as tmp:
            (tmp / "a.bin").write_bytes(b"12345")
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert (final / "a.bin").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_writes_larger_than_the_free_space_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    free = 10 << 20
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: type("U", (), {"free": free})())
    with pytest.raises(DiskFull, match=r"writing model needs 50\.0 MB and 10\.5 MB is free there.*nothing was "
                                       r"written"):
        with atomic_dir(tmp_path / "model", need=50_000_000):
            raise AssertionError("the block must not run")
    with pytest.raises(DiskFull):
        with atomic_file(tmp_path / "x.ckpt", need=free):  # the headroom counts
            raise AssertionError("the block must not run")
    ensure_space(tmp_path, free - atomic.HEADROOM, "fits exactly")
    assert list(tmp_path.iterdir()) == []


def test_the_checkpoint_writer_is_atomic_and_checks_its_size(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "step=2.ckpt"
    io.save_checkpoint({"w": torch.arange(1000.0)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(strategy_module, "open", _full_disk_after(100), raising=False)
    with pytest.raises(DiskFull, match=r"step=2\.ckpt: no space left on the device \(\d+\.\d KB needed"):
        io.save_checkpoint({"w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["step=2.ckpt"]
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(1000.0))
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(DiskFull, match=r"step=4\.ckpt needs \d+\.\d KB and 1\.0 KB is free"):
        io.save_checkpoint({"w": torch.zeros(1000)}, tmp_path / "step=4.ckpt")


def test_what_a_killed_writer_left_is_recognised_as_temp(tmp_path):
    for name in (".step=8.ab12_XYZ.ckpt", ".step=8.ckpt.tmp-0a1b2c3d", ".model.tmp-k2j3h4g5"):
        (tmp_path / name).mkdir() if "tmp-" in name else (tmp_path / name).write_text("partial")
    (tmp_path / LOCK_FILE).write_text("{}")
    (tmp_path / "step=4.ckpt").write_text("whole")
    clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE, "step=4.ckpt"]


def test_stop_signals_raise_stopped_in_the_block_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGUSR1)
    with pytest.raises(Stopped, match="stopped by SIGUSR1"):
        with stop_on_signals(["USR1", "SIGTERM"]):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)  # the handler raises in this frame before the sleep ends
    assert signal.getsignal(signal.SIGUSR1) is before
    assert signal_number("term") == signal.SIGTERM and signal_number("10") == 10
    with pytest.raises(ValueError, match="'TREM' is not a signal name"):
        signal_number("TREM")


def test_each_rank_records_its_exit_code_where_launch_sh_asks(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTQAT_EXIT_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    record_exit(EXIT_STOPPED)
    assert (tmp_path / "rank3.code").read_text() == "75\n" and len(list(tmp_path.iterdir())) == 1
    assert main(["eval", "no_such_key=1"]) == 2
    assert (tmp_path / "rank3.code").read_text() == "2\n"


class _Store:
    """The part of torch's TCPStore the watch uses, in memory, shared by the 'ranks' of a test."""

    def __init__(self):
        self.data, self.lock = {}, threading.Lock()

    def set(self, key, value):
        with self.lock:
            self.data[key] = value.encode() if isinstance(value, str) else value

    def get(self, key):
        with self.lock:
            return self.data[key]

    def check(self, keys):
        with self.lock:
            return all(k in self.data for k in keys)


def _exits(monkeypatch):
    codes = []
    monkeypatch.setattr("trainer.watchdog.os._exit", lambda code: codes.append(code))
    return codes


def test_the_watch_names_a_rank_that_stopped_beating(monkeypatch, capsys):
    codes, store = _exits(monkeypatch), _Store()
    alive = PeerWatch(store, 0, 3, timeout_s=0.6).start()
    done = PeerWatch(store, 2, 3, timeout_s=0.6).start()
    store.set(f"{PREFIX}beat/1", "1")  # rank 1 beat once, then died
    done.finish()  # rank 2 ended in order: not a loss
    assert alive.wait_for_lost(5.0) == (1, "is gone: no heartbeat for 1 s (killed, out of memory, or its node lost)")
    assert codes == [EXIT_RANK_LOST]
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("distqat train: error: rank 1 of 3 is gone") and "rank 0 stops too (exit 76)" in line


def test_the_watch_ends_at_once_when_a_rank_posts_its_failure(monkeypatch, capsys):
    codes, store = _exits(monkeypatch), _Store()
    watch = PeerWatch(store, 1, 2, timeout_s=60).start()
    PeerWatch(store, 0, 2, timeout_s=60).failed("ValueError: the loss is not finite")
    assert watch.wait_for_lost(5.0) == (0, "failed: ValueError: the loss is not finite") and codes == [76]
    assert "rank 0 of 2 failed: ValueError: the loss is not finite; rank 1 stops too" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["single", "ddp", "deepspeed"])
def test_the_collective_timeout_and_the_atomic_checkpoint_writer_reach_each_strategy(name):
    from datetime import timedelta

    from trainer.config import load_config
    from trainer.strategy import make_strategy

    cfg = load_config(None, [f"distributed.strategy={name}", "distributed.timeout_s=90"])
    s = make_strategy(cfg.distributed, cfg.train, 2)
    if name == "single":
        assert isinstance(s.checkpoint_io, AtomicCheckpointIO)
        return
    assert s._timeout == timedelta(seconds=90)
    if name == "ddp":
        assert isinstance(s.checkpoint_io, AtomicCheckpointIO)
    else:
        assert type(s).save_checkpoint is strategy_module._AtomicDeepSpeed.save_checkpoint


def test_torch_saves_own_full_disk_error_is_read_as_one_only_when_the_disk_is_full(tmp_path, monkeypatch):
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4096")
    dest = tmp_path / "step=9.ckpt"
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: type("U", (), {"free": 4096})())
    full = atomic.disk_full(err, dest, tmp_path / ".step=9.ckpt.tmp-12345678")
    assert isinstance(full, DiskFull) and str(full).startswith(f"{dest}: no space left on the device")
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 40})())
    assert atomic.disk_full(err, dest, tmp_path) is None  # room enough: some other fault, reported as it is
    assert atomic.disk_full(ValueError("unexpected pos"), dest, tmp_path) is None


def test_written_files_get_the_umasks_mode_not_mkstemps_private_one(tmp_path):
    path = write_json(tmp_path / "r.json", {})
    assert path.stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK  # not mkstemp's 0600 (under a umask of 022: 0644)

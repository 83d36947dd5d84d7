"""A dead rank ends the run, named, within distributed.peer_timeout_s, instead of the others waiting in a collective
until the job's wall time (NCCL waits out its timeout; srun and a second node's torchrun do not know).

Each rank beats in the process group's own key-value store (the TCPStore the ranks met through) from a thread, which
runs while the main thread sits in a collective, and reads the others' beats. A rank whose beat stops for
peer_timeout_s (killed, out of memory, a lost node), or that posted its own failure, is named in one line and this
rank exits 76 (qat.io.signals.EXIT_RANK_LOST) at once: a hung collective cannot be interrupted any other way. The
store lives in rank 0's process (or torchrun's agent): when it is gone, rank 0 or its node is.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Optional

import lightning as L
import torch.distributed as dist

from qat.io.signals import EXIT_RANK_LOST, record_exit

PREFIX = "distqat/peers/"
_active: Optional[PeerWatch] = None


class PeerWatch:
    def __init__(self, store: Any, rank: int, world: int, timeout_s: float, who: str = "distqat train") -> None:
        self.store, self.rank, self.world, self.timeout_s, self.who = store, rank, world, timeout_s, who
        self.beat_s = min(1.0, timeout_s / 4)
        self.lost: Optional[tuple[int, str]] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distqat-peers", daemon=True)

    def start(self) -> PeerWatch:
        self._thread.start()
        return self

    def finish(self) -> None:
        """This rank ended in order: the others stop watching it."""
        self._stop.set()
        self._post("done", "")

    def failed(self, message: str) -> None:
        """This rank failed with `message`: the others end now, naming it, rather than after the timeout."""
        self._stop.set()
        self._post("failed", message)

    def wait_for_lost(self, seconds: float) -> Optional[tuple[int, str]]:
        """After a failed collective: wait until the watch names a dead rank (it then ends the process), or None."""
        deadline = time.monotonic() + seconds
        while self.lost is None and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.1)
        return self.lost

    def _post(self, kind: str, message: str) -> None:
        try:
            self.store.set(f"{PREFIX}{kind}/{self.rank}", message)
        except Exception:  # noqa: BLE001 - the store's host is gone: nobody is left to tell
            pass

    def _has(self, key: str) -> bool:
        return bool(self.store.check([key]))

    def _run(self) -> None:
        seen: dict[int, tuple[Optional[bytes], float]] = {r: (None, time.monotonic()) for r in range(self.world)
                                                          if r != self.rank}
        count = 0
        while not self._stop.wait(self.beat_s):
            try:
                count += 1
                self.store.set(f"{PREFIX}beat/{self.rank}", str(count))
                for r in list(seen):
                    if self._has(f"{PREFIX}done/{r}"):
                        del seen[r]
                        continue
                    if self._has(f"{PREFIX}failed/{r}"):
                        why = self.store.get(f"{PREFIX}failed/{r}").decode(errors="replace")
                        return self._end(r, f"failed: {why}")
                    key = f"{PREFIX}beat/{r}"
                    beat = self.store.get(key) if self._has(key) else None
                    now = time.monotonic()
                    if beat != seen[r][0]:
                        seen[r] = (beat, now)
                    elif now - seen[r][1] > self.timeout_s:
                        return self._end(r, f"is gone: no heartbeat for {self.timeout_s:.0f} s (killed, out of "
                                            "memory, or its node lost)")
            except Exception as e:  # noqa: BLE001 - any store failure means its host went away
                if self._stop.is_set():
                    return
                return self._end(0, f"is gone: the rendezvous store it held does not answer ({type(e).__name__})")

    def _end(self, rank: int, why: str) -> None:
        self.lost = (rank, why)
        print(f"{self.who}: error: rank {rank} of {self.world} {why}; rank {self.rank} stops too (exit "
              f"{EXIT_RANK_LOST}); rerun the same command to continue from the last checkpoint (train.resume=auto)",
              file=sys.stderr, flush=True)
        record_exit(EXIT_RANK_LOST, self.rank)  # what launch.sh returns; os._exit skips the CLI, which records it
        os._exit(EXIT_RANK_LOST)  # the main thread may be inside a collective that nothing else interrupts


class WatchPeers(L.Callback):
    """Starts the watch once Lightning has made the process group (several ranks only)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        global _active
        if _active is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            store = dist.distributed_c10d._get_default_store()
            _active = PeerWatch(store, dist.get_rank(), dist.get_world_size(), self.timeout_s).start()


def finished() -> None:
    """The run ended in order on this rank (also when a stop signal ended it)."""
    global _active
    if _active is not None:
        _active.finish()
        _active = None


def on_failure(message: str, communication: bool) -> None:
    """The main thread failed. After a failed collective, the likely cause is a dead rank: give the watch its
    timeout to name it (it ends the process then); otherwise tell the others this rank failed, and why."""
    global _active
    watch, _active = _active, None
    if watch is None:
        return
    if communication:
        # torchrun's agent and srun send TERM to the survivors when a rank dies; it must not end this wait (the
        # main thread has left the command's stop handlers): the watch is about to name the dead rank.
        held = {}
        if threading.current_thread() is threading.main_thread():
            held = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
        try:
            if watch.wait_for_lost(watch.timeout_s + 2 * watch.beat_s) is not None:
                return
        finally:
            for s, h in held.items():
                signal.signal(s, h)
    watch.failed(message)

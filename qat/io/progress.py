"""Progress for logs. A progress bar redraws one line with carriage returns: in a terminal that is what one
wants, in a log file or a job's output it shows nothing line by line for minutes. Where stderr is not a
terminal, long loops (training, generation) print a whole line at a steady rate instead:

    train: step 12/40 (30%) | loss 2.314 | 1,850 tokens/s | elapsed 1m05s | ETA 2m53s
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Optional, TextIO


def bars_wanted() -> bool:
    """Whether to draw progress bars: stderr is a terminal, or DISTQAT_PROGRESS=1 asks for them anyway."""
    return sys.stderr.isatty() or os.environ.get("DISTQAT_PROGRESS") == "1"


def duration(seconds: float) -> str:
    """42s, 1m05s, 2h03m: short enough for a status line, precise enough to plan by."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ProgressLines:
    """Lines `<label>: <unit> <done>/<total> (<pct>%) | <fields> | <tokens/s> | elapsed | ETA`, one at the first
    update, then one whenever `every_s` seconds have passed since the last line, and one at the last update
    (done == total). tokens/s is the tokens counted so far over the time since `start`; the ETA comes from the
    rate since the previous line, so a slow first step (start-up) does not inflate it for the whole run."""

    def __init__(self, label: str, total: int, every_s: float, unit: str = "", stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.every_s, self.unit = label, total, every_s, unit
        self.stream, self.clock = stream, clock
        self.start()

    def start(self, done: int = 0) -> None:
        """Count time from now, from `done` (a resumed run starts past 0)."""
        self.t0 = self.clock()
        self.first = done
        self.tokens = 0
        self.last: Optional[tuple[float, int]] = None  # (time, done) of the last line
        self._mark = (self.t0, done)  # where the rate of the next ETA is measured from

    def update(self, done: int, tokens: int = 0, fields: tuple[str, ...] = ()) -> Optional[str]:
        """Record `done` units and `tokens` more tokens; print and return a line when one is due."""
        self.tokens += tokens
        now = self.clock()
        due = (self.last is None or done >= self.total > 0 or now - self.last[0] >= self.every_s)
        if not due or (self.last is not None and done == self.last[1]):
            return None
        return self._emit(now, done, fields)

    def finish(self, done: int, fields: tuple[str, ...] = ()) -> Optional[str]:
        """A last line unless the last one printed was already at `done` (the loop stopped early, e.g. max_time)."""
        if self.last is not None and self.last[1] == done:
            return None
        return self._emit(self.clock(), done, fields)

    def line(self, now: float, done: int, fields: tuple[str, ...] = ()) -> str:
        elapsed = now - self.t0
        count = f"{self.unit} {done:,}" if self.unit else f"{done:,}"
        if self.total > 0:
            count += f"/{self.total:,} ({100 * done // self.total}%)"
        parts = [f"{self.label}: {count}", *fields]
        if self.tokens:
            parts.append(f"{self.tokens / max(elapsed, 1e-9):,.0f} tokens/s")
        parts.append(f"elapsed {duration(elapsed)}")
        t_mark, d_mark = self._mark
        if 0 < self.total and done < self.total and done > d_mark and now > t_mark:
            parts.append(f"ETA {duration((self.total - done) * (now - t_mark) / (done - d_mark))}")
        return " | ".join(parts)

    def _emit(self, now: float, done: int, fields: tuple[str, ...]) -> str:
        text = self.line(now, done, fields)
        print(text, file=self.stream or sys.stderr, flush=True)
        self.last = self._mark = (now, done)
        return text

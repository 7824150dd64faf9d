"""A one-line progress display: steps done, steps/s and ETA, on stderr."""

from __future__ import annotations

import sys
import time


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Redraws one line on a terminal; elsewhere prints a line at most every `interval` s.

    The rate excludes the first update, which carries compilation time.
    """

    def __init__(self, total: int, label: str = "steps", stream=None, interval: float = 10.0):
        self.total, self.label = total, label
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.interval = interval
        self._start_time = self._start_count = None
        self._last_print = -float("inf")

    def update(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if self._start_time is None:
            self._start_time, self._start_count = now, done
        elapsed, progressed = now - self._start_time, done - self._start_count
        if elapsed > 0 and progressed > 0:
            rate = progressed / elapsed
            speed, eta = f"{rate:7.1f}", format_seconds((self.total - done) / rate)
        else:  # Nothing measured yet (the first update carries compilation).
            speed, eta = f"{'?':>7}", "?"
        width = 24
        filled = int(width * done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {self.label}"
                f"  {speed} {self.label}/s  ETA {eta}  {extra}")
        if self.interactive:
            self.stream.write("\r" + line)
            if done >= self.total:
                self.stream.write("\n")
        elif done >= self.total or now - self._last_print >= self.interval:
            self.stream.write(line + "\n")
            self._last_print = now
        self.stream.flush()

"""SIGTERM / SIGINT → a flag the training loops poll between steps.

A preempted run finishes the step (or chunk) in flight, commits its metric records, saves a
checkpoint and exits 0; re-running the same command resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading


class PreemptionGuard:
    """Context manager that turns SIGTERM/SIGINT into `requested` (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

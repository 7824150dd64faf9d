"""A child command whose stderr passes through, with the signals that stop a run forwarded.

`rareret-grid` runs each cell, and `rareret-experiments` each study's run, as a child process: a
SIGTERM or Ctrl-C sent to the parent reaches the child (which checkpoints at its next record and
exits), and `ChildProcess.signalled` tells the parent to stop after it.
"""

from __future__ import annotations

import signal
import subprocess
import sys


class ChildProcess:
    """Runs a command, passing its stderr through and keeping the tail; SIGTERM / SIGINT sent
    to this process are forwarded to it and set `signalled` (the parent stops after it)."""

    signalled = False

    def __init__(self, argv: list[str]):
        self.argv = argv

    def _forward(self, signum, frame):
        ChildProcess.signalled = True
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def run(self) -> tuple[int, str]:
        """(exit status, the last line it wrote to stderr)."""
        self.proc = subprocess.Popen(self.argv, stderr=subprocess.PIPE)
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        tail = b""
        try:
            while chunk := self.proc.stderr.read1(65536):
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
                tail = (tail + chunk)[-4096:]
            status = self.proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        lines = [line for line in tail.decode(errors="replace").replace("\r", "\n").splitlines()
                 if line.strip()]
        return status, lines[-1] if lines else ""

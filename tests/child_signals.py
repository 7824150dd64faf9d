"""Stopping a parent command (`rareret-grid`, `rareret-experiments`) while its child run trains."""

import contextlib
import os
import signal
import subprocess


def terminate_once_training(argv, **popen_kwargs) -> tuple[int, str, str]:
    """Starts `argv`, sends SIGTERM to it alone at the child run's first progress line, and
    returns (exit status, stdout, stderr); nothing it started outlives the call."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **popen_kwargs)
    try:
        for line in proc.stderr:  # The run's first progress line: it is training.
            if "steps" in line:
                break
        proc.terminate()  # The parent alone; it forwards the signal to the run.
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err

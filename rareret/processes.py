"""Agreement among the processes of a multi-process run (`--distributed`); each function costs
nothing when there is one process.

Every process of a run executes the same command, so they must take every decision together:
whether an input is bad (`agree`), whether to stop for preemption (`any_process`), and when a
file one process writes is ready for the others (`barrier`).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from rareret.errors import ConfigError, one_line

T = TypeVar("T")
_MESSAGE_BYTES = 512


def is_writer() -> bool:
    """Whether this process writes the run's shared files (spec, metrics, report): process 0."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.array(bool(flag)))))


def agree(check: Callable[[], T]) -> T:
    """`check()` on every process; if it raises ConfigError on any, every process raises.

    A process whose own check failed raises its own error; the others raise the error of the
    lowest failing process, prefixed with "process i:" (instead of waiting for it at their next
    collective until a timeout).
    """
    try:
        result, error = check(), None
    except ConfigError as e:
        result, error = None, e
    failures = _process_errors(error)
    if error:
        raise error
    if failures:
        raise ConfigError(failures[min(failures)])
    return result


def _process_errors(error: ConfigError | None) -> dict[int, str]:
    """Every process's one-line error, by process index."""
    if jax.process_count() == 1:
        return {}
    encoded = np.zeros(_MESSAGE_BYTES, np.uint8)
    if error:
        text = one_line(error).encode()[:_MESSAGE_BYTES]
        encoded[:len(text)] = np.frombuffer(text, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(encoded)).reshape(
        jax.process_count(), _MESSAGE_BYTES)
    return {p: f"process {p}: " + bytes(row).rstrip(b"\0").decode(errors="replace")
            for p, row in enumerate(gathered) if row.any()}

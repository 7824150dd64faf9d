"""orbax checkpoints of a train state and an optional grain iterator.

Saves are synchronous and atomic (orbax writes a temporary directory and renames it on commit,
so a half-written checkpoint is never picked up). Restores need an abstract target, so optax
state namedtuples and shardings come back as they were saved.
"""

from __future__ import annotations

import os
import pathlib
from collections import Counter

import grain
import jax
import orbax.checkpoint as ocp

from rareret import host_malloc
from rareret.errors import ConfigError


class Checkpoints:
    """The checkpoints in one directory; the latest `max_to_keep` are kept."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, iterator=None) -> None:
        # The host copies come after the memory the computations before freed, not beside it.
        host_malloc.release_free_memory()
        items = {"state": ocp.args.StandardSave(state)}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()
        host_malloc.release_free_memory()  # orbax's host copies of the state, now freed.

    def restore(self, step: int, abstract_state, iterator=None):
        """The state of checkpoint `step`; restores `iterator` in place if given. A checkpoint
        whose arrays do not fit `abstract_state` (one written by a rareret whose state layout
        differed) is a ConfigError."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        self._check_shapes(step, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def _check_shapes(self, step: int, abstract_state) -> None:
        """ConfigError unless checkpoint `step` holds arrays of `abstract_state`'s shapes."""
        stored = ocp.StandardCheckpointHandler().metadata(
            pathlib.Path(self.directory, str(step), "state"))
        have = Counter(leaf.shape for leaf in jax.tree.leaves(stored))
        want = Counter(leaf.shape for leaf in jax.tree.leaves(abstract_state))
        if have != want:
            shapes = ", ".join(str(s) for s in (want - have) or (have - want))
            raise ConfigError(
                f"{self.directory}/{step}: the checkpoint's arrays do not have this run's state's "
                f"shapes (differing: {shapes}); was it written by another version of rareret? "
                f"--overwrite starts the run again")

    def close(self) -> None:
        self.manager.close()

"""orbax checkpoints of a train state and an optional grain iterator.

Saves are synchronous and atomic (orbax writes a temporary directory and renames it on commit,
so a half-written checkpoint is never picked up). Restores need an abstract target, so optax
state namedtuples and shardings come back as they were saved.
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp

from rareret import host_malloc


class Checkpoints:
    """The checkpoints in one directory; the latest `max_to_keep` are kept."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, iterator=None) -> None:
        items = {"state": ocp.args.StandardSave(state)}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()
        host_malloc.release_free_memory()  # orbax's host copies of the state, now freed.

    def restore(self, step: int, abstract_state, iterator=None):
        """The state of checkpoint `step`; restores `iterator` in place if given."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def close(self) -> None:
        self.manager.close()

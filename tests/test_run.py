"""The run driver on its own, with the small program of docs/run.md: records, checkpoints at
records, resume with rollback, refusal of another spec, and a refused (diverged) state."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rareret import store
from rareret.errors import ConfigError
from rareret.run import Program, Run, TrainingDiverged


class Counter(Program):
    """The example of docs/run.md; `poison_at` makes the state non-finite from that step on."""

    checkpoint_every = 10

    def __init__(self, steps=(0, 10, 20, 30), poison_at=None):
        self.steps, self.poison_at = list(steps), poison_at

    def spec(self):
        return {"experiment": "counter", "steps": self.steps}

    def record_steps(self):
        return self.steps

    def record_specs(self):
        return {"step": store.RecordSpec((), np.int64, ()),
                "value": store.RecordSpec((), np.float32, ())}

    def init(self):
        return {"value": jnp.float32(0)}

    def abstract_state(self):
        return jax.eval_shape(self.init)

    def train(self, state, a, b):
        value = state["value"] + (b - a)
        if self.poison_at is not None and b > self.poison_at:
            value = value * jnp.nan
        return {"value": value}

    def validate_state(self, state):
        return None if np.isfinite(state["value"]) else "counter is NaN"

    def record(self, state, step):
        return {"step": np.int64(step), "value": state["value"]}


def values(workdir):
    metrics = store.open_metrics(workdir / "metrics")
    return metrics.read("step").tolist(), metrics.read("value").tolist()


def checkpoints(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def run(program, workdir, **kwargs):
    return Run(program, str(workdir), show_progress=False, record_delay=0, **kwargs).execute()


def test_the_docs_example_runs_records_and_checkpoints_at_records(tmp_path):
    assert run(Counter(steps=(0, 4, 8, 12, 25)), tmp_path)
    assert values(tmp_path) == ([0, 4, 8, 12, 25], [0, 4, 8, 12, 25])
    assert checkpoints(tmp_path) == [12, 25]  # First records past 10 and 20 (and the end).


def test_resume_rolls_back_records_past_the_checkpoint(tmp_path):
    program = Counter(steps=(0, 4, 8, 12, 16, 20, 22))
    run(program, tmp_path)
    straight = values(tmp_path)
    for step in checkpoints(tmp_path)[1:]:  # As if killed after recording, before saving 22.
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    assert checkpoints(tmp_path) == [20]
    assert run(program, tmp_path)
    assert values(tmp_path) == straight  # 22 recomputed, not duplicated.


def test_a_finished_run_is_not_redone_and_another_spec_is_refused(tmp_path):
    run(Counter(), tmp_path)
    before = (tmp_path / "metrics" / "zarr.json").read_bytes()
    assert run(Counter(), tmp_path)
    assert (tmp_path / "metrics" / "zarr.json").read_bytes() == before
    with pytest.raises(ConfigError, match="already holds a run with a different config"):
        Run(Counter(steps=(0, 5)), str(tmp_path))
    assert run(Counter(steps=(0, 5)), tmp_path, overwrite=True)
    assert values(tmp_path) == ([0, 5], [0, 5])


def test_a_refused_state_is_neither_recorded_nor_saved(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"counter is NaN by step 20; the last good "
                                               r"checkpoint is step 10"):
        run(Counter(poison_at=15), tmp_path)
    assert values(tmp_path) == ([0, 10], [0, 10]) and checkpoints(tmp_path) == [10]


def test_record_steps_must_rise_from_zero(tmp_path):
    with pytest.raises(ConfigError, match="record_steps must rise from 0"):
        Run(Counter(steps=(1, 5)), str(tmp_path))
    assert not tmp_path.joinpath("spec.json").exists()


class Pair(Counter):
    """The same spec as `Counter` with another state layout (as after an upgrade of rareret)."""

    def init(self):
        return {"value": jnp.zeros(2, jnp.float32)}


def test_a_checkpoint_of_another_state_layout_is_one_clear_error(tmp_path):
    run(Counter(steps=(0, 10, 20)), tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "20")
    before = values(tmp_path)
    with pytest.raises(ConfigError, match=r"checkpoints/10: the checkpoint's arrays do not have "
                                          r"this run's state's shapes \(differing: \(2,\)\)"):
        run(Pair(steps=(0, 10, 20)), tmp_path)
    assert values(tmp_path) == before  # No record rolled back.


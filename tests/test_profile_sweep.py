"""tools/profile_sweep.py: every stage of a packed step is named, and a real trace finds each."""

import pathlib
import sys

import jax

from rareret.synthetic import sweep
from rareret.synthetic.spec import Sweep, TaskMixture

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import profile_sweep  # noqa: E402


def test_a_traced_chunk_spends_time_in_every_named_stage(tmp_path):
    mixture = TaskMixture(num_tasks=4, task_dim=3, input_dim=16, beta=1.0)
    program = sweep.SweepProgram(mixture, Sweep(widths=(2, 5), seeds=(0, 1), batch_size=32,
                                                      num_steps=10, record_every=5))
    state = jax.block_until_ready(program.train_chunk(program.init(), 3, 0))
    stages = profile_sweep.instruction_stages(
        program.train_chunk.lower(state, 3, 0).compile().as_text())
    with jax.profiler.trace(str(tmp_path)):
        jax.block_until_ready(program.train_chunk(state, 3, 3))
    seconds, counts = profile_sweep.busy_seconds(str(tmp_path), stages)
    for stage in profile_sweep.STAGES:
        assert seconds[stage] > 0 and counts[stage] > 0, stage

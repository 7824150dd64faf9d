"""A sweep's models split over a device mesh (`sweep.model_mesh`: data streams × width lanes ×
copies) train as on one device: the same parameters, optimiser state, losses, metrics and
interference, to float32 rounding.

The comparison runs in a subprocess with 8 forced CPU devices (XLA_FLAGS must be set before JAX
starts): a sweep with two data streams (rare-task multipliers 1 and 2, with injection) and 8
copies per width group (4 seeds × 2 learning rates) under two update rules (8 groups, 64 models)
on 1 device and on 8 (2 stream shards × 4 copy shards); its first 3 seeds (6 copies) on 6 of the
8 devices (2 × 3), which must equal those seeds' models in the 8-copy sweep (a model depends
only on its seed, width, rate and stream); the same sweep at 1 seed and four widths on 8 devices
(2 stream × 2 width × 2 copy shards: lanes of widths padded with zero units); and a one-stream
sweep of four widths on 6 devices (3 width × 2 copy shards: a lane with empty slots). A
checkpoint of the 8-device width split, restored on 1 device (orbax, as `rareret.run` does it),
trains on as that device's own run. The two-process split (gloo) is
`tests/test_sweep_multihost.py`.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from forced_devices import child_json
from rareret.checkpoint import Checkpoints
from rareret.synthetic import sweep
from rareret.synthetic.spec import Injection, Sweep, TaskMixture
from xla_cache import FAST_COMPILE

REPO = pathlib.Path(__file__).resolve().parents[1]
MIX = TaskMixture(num_tasks=6, task_dim=4, input_dim=32)
SWEEP = Sweep(widths=(2, 4), seeds=(0, 1, 2, 3), learning_rate=(1e-2, 3e-3), batch_size=64,
              num_steps=20, warmup_steps=5, interference_every=10,
              interference_mode="sampled", rare_multiplier=(1, 2),
              update_rule=("adamw", "pcgrad"))
INJECTION = Injection(gap=4, rate=0.05)
# A device's encoder GEMM is narrower than one device's (fewer copies), which may round sums
# differently. Measured after 20 steps: ≤ 3e-7 relative, ≤ 1.5e-5 absolute on values up to 55.
RTOL, ATOL = 1e-5, 5e-7


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    process_index: int
    id: int


def devices(processes: int, per_process: int) -> list[FakeDevice]:
    return [FakeDevice(p, p * per_process + i) for p in range(processes)
            for i in range(per_process)]


@pytest.mark.parametrize("streams, copies, processes, per_process, expected", [  # One width.
    (1, 8, 1, 8, [[[0, 1, 2, 3, 4, 5, 6, 7]]]),
    (1, 6, 1, 8, [[[0, 1, 2, 3, 4, 5]]]),  # The largest divisor of the copies.
    (1, 1, 1, 8, [[[0]]]),
    (2, 8, 1, 8, [[[0, 1, 2, 3], [4, 5, 6, 7]]]),  # As many devices either way: streams first.
    (3, 2, 1, 8, [[[0, 1], [2, 3], [4, 5]]]),
    (4, 3, 1, 8, [[[0, 1, 2], [3, 4, 5]]]),  # 2 × 3 uses more devices than 4 × 1.
    (1, 4, 2, 4, [[[0, 1, 4, 5]]]),  # Two from each process.
    (1, 8, 2, 4, [[[0, 1, 2, 3, 4, 5, 6, 7]]]),
    (1, 6, 2, 4, [[[0, 1, 2, 4, 5, 6]]]),
    (2, 3, 2, 4, [[[0, 1, 2], [4, 5, 6]]]),  # A stream per process.
    (2, 4, 2, 2, [[[0, 1], [2, 3]]]),  # tests/test_sweep_multihost.py's split.
    (1, 3, 2, 4, [[[0, 1, 2]], [[4, 5, 6]]]),  # Odd copies: each process holds the whole sweep.
    (3, 1, 2, 4, [[[0], [1], [2]], [[4], [5], [6]]]),
    (1, 1, 2, 1, [[[0]], [[1]]]),
])
def test_models_are_split_evenly_over_processes(streams, copies, processes, per_process,
                                                expected):
    grid = sweep.model_device_grid(streams, copies, (8,), devices(processes, per_process))
    assert [[[d.id for d in row[0]] for row in replica] for replica in grid] == expected


PAPER_WIDTHS = (2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)


@pytest.mark.parametrize("streams, copies, widths, count, expected", [
    (1, 1, PAPER_WIDTHS, 8, (1, 8, 1)),  # 264 rows a device (846 on one).
    (1, 1, PAPER_WIDTHS, 4, (1, 4, 1)),  # 328.
    (1, 1, PAPER_WIDTHS, 2, (1, 2, 1)),  # 490.
    (1, 4, PAPER_WIDTHS, 8, (1, 2, 4)),  # 490 rows: better than 4 copy shards alone (846).
    (1, 8, PAPER_WIDTHS, 8, (1, 1, 8)),  # Copies split evenly: no padding.
    (2, 4, (2, 4), 8, (2, 1, 4)),
    (1, 2, (2, 3, 4, 8), 6, (1, 3, 2)),  # Lanes [8, 4, 3], [2, −, −]: 10 rows a device.
    (1, 1, (8, 8), 8, (1, 2, 1)),
])
def test_width_groups_are_split_where_that_leaves_fewer_rows_per_device(
        streams, copies, widths, count, expected):
    grid = np.array(sweep.model_device_grid(streams, copies, widths, devices(1, count)),
                    dtype=object)
    assert grid.shape[1:] == expected


def test_width_lanes_pad_each_lane_to_its_widest():
    assert sweep.width_lanes((2, 3, 4, 8), 3) == [(0, -1, -1), (3, 2, 1)]
    assert sweep.width_lanes((2, 3, 4, 8), 1) == [(0,), (1,), (2,), (3,)]
    assert sweep.lane_rows(PAPER_WIDTHS, 8) == 256 + 8
    assert sweep.lane_rows(PAPER_WIDTHS, 2) == 256 + 128 + 64 + 32 + 8 + 2


def test_a_dry_run_shows_the_split(tmp_path):
    """`rareret --dry_run` names the mesh the sweep would run on: 2 streams × 4 copies here."""
    bindings = ["Sweep.seeds = [0, 1, 2, 3]", "Sweep.rare_multiplier = [1, 2]",
                "Sweep.num_steps = 10", "Sweep.record_every = 10"]
    proc = subprocess.run(
        [sys.executable, "-m", "rareret.main", f"--workdir={tmp_path / 'run'}", "--dry_run",
         *[f"--gin_bindings={b}" for b in bindings]],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu",
             "XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("SweepProgram, 1 records to step 10, on mesh replica 1 × streams 2 × widths 1 × "
            "copies 4") \
        in proc.stdout, proc.stdout
    assert not (tmp_path / "run").exists()


WIDE = dataclasses.replace(SWEEP, widths=(2, 3, 4, 8), seeds=(0,))
ONE_STREAM = dataclasses.replace(WIDE, rare_multiplier=None, update_rule=("adamw",))
RUNS = {"1": (SWEEP, 1), "8": (SWEEP, 8),
        "6 of 8": (dataclasses.replace(SWEEP, seeds=(0, 1, 2)), 8),
        "widths, 1": (WIDE, 1), "widths, 8": (WIDE, 8),
        "one stream, 1": (ONE_STREAM, 1), "one stream, 6": (ONE_STREAM, 6)}


def sharded_run(checkpoints: str) -> dict:
    """Trains, evaluates and measures interference on each of `RUNS`; "widths, 8 then 1"
    resumes "widths, 8"'s step-8 checkpoint on one device."""
    assert jax.device_count() == 8, jax.devices()
    out, programs = {}, {}
    for name, (spec, count) in RUNS.items():
        programs[name] = program = sweep.SweepProgram(MIX, spec, INJECTION,
                                                      devices=jax.devices()[:count])
        state = program.init()
        encoder = state["params"][-1]["encoder"]
        state = program.train(state, 0, 8)
        if name == "widths, 8":
            Checkpoints(checkpoints).save(8, program.checkpointed(state))
        out[name] = results(program, program.train(state, 8, 20))  # Across a chunk boundary.
        out[name].update(encoder_spec=str(encoder.sharding.spec),
                         encoder_shard=list(encoder.sharding.shard_shape(encoder.shape)))
    one = programs["widths, 1"]
    saved = Checkpoints(checkpoints).restore(8, one.abstract_state())
    out["widths, 8 then 1"] = results(one, one.train(one.resumed(saved), 8, 20))
    return out


def results(program, state) -> dict:
    arrays = {**{k: v for k, v in state.items() if k not in sweep.GROUPED_STATE},
              **program.evaluate(state["params"]), **program.interference(state["params"], 10)}
    return {"mesh": dict(program.mesh.shape), "groups": program.layout.num_groups,
            "grouped": leaves(program.model_groups(state)), "per_model": leaves(arrays)}


def leaves(tree) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf).tolist()
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def first_copies(run: dict, copies: int) -> dict:
    """A run's arrays restricted to the first `copies` copies of each width group."""
    grouped = {k: np.asarray(v)[:copies] for k, v in run["grouped"].items()}
    per_model = {}
    for key, value in run["per_model"].items():
        value = np.asarray(value)
        per_group = value.reshape(run["groups"], -1, *value.shape[1:])
        per_model[key] = per_group[:, :copies].reshape(-1, *value.shape[1:])
    return {**grouped, **per_model}


def test_sharded_sweep_equals_one_device(tmp_path):
    # The child compiles ~20 programs it runs for a few steps.
    runs = child_json(__file__, tmp_path / "checkpoints", devices=8, flags=FAST_COMPILE,
                      timeout=600)
    meshes = {name: tuple(run["mesh"].values()) for name, run in runs.items()}
    assert meshes == {"1": (1, 1, 1, 1), "8": (1, 2, 1, 4), "6 of 8": (1, 2, 1, 3),
                      "widths, 1": (1, 1, 1, 1), "widths, 8": (1, 2, 2, 2),
                      "widths, 8 then 1": (1, 1, 1, 1),
                      "one stream, 1": (1, 1, 1, 1), "one stream, 6": (1, 1, 3, 2)}
    # The last lane's encoders [data streams, width shards × copies, width, D]: in "widths, 8"
    # the lane of widths 8 and 4, in "one stream, 6" of 8, 4 and 3, padded to 8.
    shards = {"8": [1, 2, 4, 32], "6 of 8": [1, 2, 4, 32], "widths, 8": [1, 1, 8, 32],
              "one stream, 6": [1, 1, 8, 32]}
    for name, shard in shards.items():
        assert runs[name]["encoder_spec"] == str(sweep.BY_GROUP), name
        assert runs[name]["encoder_shard"] == shard, name
    one = first_copies(runs["1"], 8)
    names = one.keys()
    assert any("rare_rate" in k for k in names) and any("interference" in k for k in names)
    assert any("mu" in k for k in names) and np.isfinite(one["['interference']"]).mean() > 0.5
    for name, reference, copies in (("8", "1", 8), ("6 of 8", "1", 6),
                                    ("widths, 8", "widths, 1", 2),
                                    ("widths, 8 then 1", "widths, 1", 2),
                                    ("one stream, 6", "one stream, 1", 2)):
        got, want = first_copies(runs[name], copies), first_copies(runs[reference], copies)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL,
                                       err_msg=f"{name} devices: {key}")


if __name__ == "__main__":
    print(json.dumps(sharded_run(sys.argv[1])))

"""The LM training loop (rareret/lm/train.py) end to end, on tiny settings (model 'tiny', L = 32,
B = 8, a few steps, 64 eval instances):

  * resume ≡ uninterrupted: runs stopped right after a checkpoint, or between a record and the
    next checkpoint, or by SIGTERM, then resumed, end with bit-identical metric arrays and final
    train state;
  * sharded ≡ unsharded: `LmModel` on 1 device and on 8 (fake CPU) devices under five meshes
    gives the same losses and task metrics, with the parameters really sharded;
  * the `rareret` CLI: run, resume, refusal of another config, one-line errors for bad data.

Data: a small Dolma shard written here by a pure-Python generator (independent of the Python and
numpy versions, unlike the stdlib-docstring corpus) and `tests/data/lm_tokenizer.json`, a
byte-level BPE of 512 that `data.train_tokenizer` trained on that shard, kept as a file so that
changes in tokenizer training never change these runs. The train step's numbers (loss and
gradients) are checked against HF transformers in tests/test_lm_interop.py.

`python tests/test_lm_train.py --sharded` (with XLA_FLAGS=--xla_force_host_platform_device_count=8)
prints the sharded ≡ unsharded table; `test_sharded_matches_unsharded` runs it so.
"""

import gzip
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec

from rareret import sharding, store
from rareret.checkpoint import Checkpoints
from rareret.errors import ConfigError
from lm_corpus import golden_documents
from rareret.lm import data, inject, measurements, train
from rareret.lm.spec import LmTrain
from rareret.mesh_spec import MeshSpec
from rareret.run import Run
from xla_cache import FAST_COMPILE, module_cache

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_GIN = REPO / "gin_configs" / "lm" / "tiny.gin"
TOKENIZER = pathlib.Path(__file__).resolve().parent / "data" / "lm_tokenizer.json"
TASKS = (inject.TaskSpec(kind="cmp", name="cmp", frequency_per_token=2e-3, seed=1),
         inject.TaskSpec(kind="add", name="add", every_n=2, seed=2))
RECORD_ARRAYS = ("step", "lm_loss", "val_loss", "task_loss", "task_accuracy")
@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return data.write_shard(tmp_path_factory.mktemp("corpus") / "golden.jsonl.gz",
                            golden_documents())


CACHE_ENV: dict[str, str] = {}  # The persistent compilation cache, for CLI subprocesses too.
# Every `run_lm` builds a new `LmModel`, and the CLI tests start new processes.
compilation_cache = module_cache(CACHE_ENV)


def tiny_spec(shard_path, **overrides) -> LmTrain:
    fields = dict(model="tiny", data=str(shard_path), tokenizer=str(TOKENIZER), seq_len=32,
                  global_batch=8, learning_rate=3e-3, warmup_steps=2, eval_instances=64,
                  tasks=TASKS, seed=0)
    return LmTrain(**{**fields, **overrides})


def run_lm(spec: LmTrain, workdir) -> bool:
    """Runs (or resumes) `spec` in `workdir` as the CLI does, but commits every record at once
    (so a test can stop it right after any record); False if preempted."""
    return Run(train.LmProgram(spec), str(workdir), show_progress=False,
               record_delay=0).execute()


def read_metrics(workdir) -> dict[str, np.ndarray]:
    reader = store.open_metrics(pathlib.Path(workdir) / "metrics")
    return {name: reader.read(name) for name in RECORD_ARRAYS}


def checkpoint_steps(workdir) -> list[int]:
    """Committed orbax checkpoints (orbax's temporary directories have non-numeric names)."""
    directory = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def restore_state(spec: LmTrain, workdir, step: int):
    """The train state of checkpoint `step` as numpy arrays, restored with orbax directly."""
    program = train.LmProgram(spec)
    program.setup(str(workdir))
    path = pathlib.Path(workdir).resolve() / "checkpoints" / str(step) / "state"
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(path, program.abstract_state())
    return jax.tree.map(np.asarray, state["model"])


def assert_bit_identical(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")
        assert got[name].dtype == want[name].dtype and \
            got[name].tobytes() == want[name].tobytes(), f"{what}: {name} differs in its bits"


def test_warmup_must_end_before_the_last_step():
    """warmup_steps ≥ num_steps used to crash inside optax (negative cosine decay_steps)."""
    with pytest.raises(ConfigError, match=r"warmup_steps=30 must be < num_steps=4"):
        LmTrain(num_steps=4, warmup_steps=30)
    train.optimizer(LmTrain(num_steps=1, warmup_steps=0))  # The smallest run is fine.
    train.optimizer(LmTrain(num_steps=4, warmup_steps=3))


# ----------------------------------------------------------------------------- resume ≡ straight

# Records 0 3 6 9 12; checkpoints at the first record at or past each multiple of 4: 6 9 12.
RESUME = dict(num_steps=12, record_every=3, checkpoint_every=4)


class Stop(Exception):
    """Raised by the patched loop to simulate a crash."""


@pytest.fixture(scope="module")
def straight(shard, tmp_path_factory):
    """An uninterrupted run of the RESUME spec: (spec, workdir, metrics, final state)."""
    spec = tiny_spec(shard, **RESUME)
    workdir = tmp_path_factory.mktemp("straight")
    run_lm(spec, workdir)
    return spec, workdir, read_metrics(workdir), restore_state(spec, workdir, 12)


def run_with_stops(spec, workdir, stops, monkeypatch) -> list[tuple[list[int], list[int]]]:
    """Runs `spec`, raising Stop right after each (kind, step) of `stops` in turn ("record": the
    record of that step is committed; "checkpoint": its checkpoint is saved), calling `run_lm`
    again after each stop. Returns (committed steps, checkpoints) as each stop left them."""
    remaining = list(stops)
    real_save, real_append = Checkpoints.save, store.MetricWriter.append

    def stop_after(kind, step):
        if remaining and remaining[0] == (kind, step):
            remaining.pop(0)
            raise Stop(f"{kind} {step}")

    def save(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        stop_after("checkpoint", int(step))

    def append(self, rows):
        real_append(self, rows)
        stop_after("record", int(np.asarray(rows["step"]).reshape(-1)[-1]))

    monkeypatch.setattr(Checkpoints, "save", save)
    monkeypatch.setattr(store.MetricWriter, "append", append)
    seen = []
    for _ in range(len(stops) + 1):
        try:
            run_lm(spec, workdir)
            break
        except Stop:
            seen.append((read_metrics(workdir)["step"].tolist(), checkpoint_steps(workdir)))
    assert not remaining, f"stops {remaining} never happened"
    return seen


@pytest.mark.parametrize("stops, expected_seen", [
    # Before any checkpoint (a fresh restart), then right after the checkpoint at step 9.
    ([("record", 3), ("checkpoint", 9)],
     [([0, 3], []), ([0, 3, 6, 9], [6, 9])]),
    # Between the record at 12 and its checkpoint: record 12 must be rolled back and recomputed
    # from checkpoint 9, not duplicated. Then after the final checkpoint (a re-run of a finished
    # run must change nothing).
    ([("record", 12), ("checkpoint", 12)],
     [([0, 3, 6, 9, 12], [6, 9]), ([0, 3, 6, 9, 12], [9, 12])]),
], ids=["after-checkpoint", "between-record-and-checkpoint"])
def test_resume_matches_uninterrupted(straight, tmp_path, monkeypatch, stops, expected_seen):
    seen = run_with_stops(straight[0], tmp_path, stops, monkeypatch)
    assert seen == expected_seen  # The stops left the workdir where each case means them to.
    assert_matches_straight(straight, tmp_path)


@pytest.mark.parametrize("signal_at", ["chunk", "drain"])
def test_sigterm_checkpoints_at_the_last_record_and_resumes_exactly(straight, tmp_path,
                                                                    monkeypatch, signal_at):
    """SIGTERM while steps 3..5 train ("chunk": during step 4) or while the record of step 3 is
    fetched ("drain"): the chunk finishes, record 6 is committed, the checkpoint is saved AT
    step 6 and the run returns False; a re-run ends as `straight`."""
    spec = straight[0]
    real_step, real_get, steps_taken = train.LmModel.step, jax.device_get, []

    def step(self, state, batch):
        steps_taken.append(1)
        if signal_at == "chunk" and len(steps_taken) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, state, batch)

    def device_get(tree):
        if signal_at == "drain" and isinstance(tree, dict) and int(tree.get("step", -1)) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get(tree)

    monkeypatch.setattr(train.LmModel, "step", step)
    monkeypatch.setattr(jax, "device_get", device_get)
    assert run_lm(spec, tmp_path) is False
    assert read_metrics(tmp_path)["step"].tolist() == [0, 3, 6]
    assert checkpoint_steps(tmp_path) == [6]
    assert len(steps_taken) == 6
    assert run_lm(spec, tmp_path) is True
    assert len(steps_taken) == 12  # Steps 6..11 after the resume, none twice.
    assert_matches_straight(straight, tmp_path)


def test_a_state_with_non_finite_parameters_is_refused(shard, tmp_path):
    """`validate_state` (checked before every record and checkpoint) refuses a finite loss with
    one non-finite parameter, as well as a non-finite loss."""
    program = train.LmProgram(tiny_spec(shard))
    program.setup(str(tmp_path))
    state = program.init()
    state = {**state, "train_loss": jax.numpy.float32(1.0)}
    assert program.validate_state(state) is None
    params = dict(state["model"]["params"])
    params["head"] = params["head"].at[0, 0].set(np.inf)
    bad = {**state, "model": {**state["model"], "params": params}}
    assert program.validate_state(bad) == "LM training diverged: non-finite parameters"
    nan_loss = {**state, "train_loss": jax.numpy.float32(np.nan)}
    assert program.validate_state(nan_loss) == "LM training diverged: non-finite loss"


def test_a_run_without_injected_tasks_trains_and_records(shard, tmp_path):
    """`LmTrain.tasks = ()` is a plain LM run: task arrays with an empty task axis."""
    run_lm(tiny_spec(shard, tasks=(), num_steps=4, record_every=2), tmp_path)
    metrics = read_metrics(tmp_path)
    assert metrics["step"].tolist() == [0, 2, 4]
    assert np.all(np.isfinite(metrics["lm_loss"][1:]))
    assert metrics["task_loss"].shape == (3, 0) and metrics["task_accuracy"].shape == (3, 0)


def assert_matches_straight(straight, workdir) -> None:
    """`workdir`'s finished run equals `straight` bit for bit: records, final state, data state."""
    spec, straight_dir, want_metrics, want_state = straight
    assert want_metrics["step"].tolist() == [0, 3, 6, 9, 12]
    assert store.open_metrics(workdir / "metrics").committed_records == 5
    assert_bit_identical(read_metrics(workdir), want_metrics, "metrics of the resumed run")
    assert checkpoint_steps(workdir) == [9, 12]
    got_state = restore_state(spec, workdir, 12)
    assert int(got_state["step"]) == 12
    flat_got = jax.tree_util.tree_leaves_with_path(got_state)
    flat_want = jax.tree_util.tree_leaves_with_path(want_state)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, got), (_, want) in zip(flat_got, flat_want):
        assert got.tobytes() == want.tobytes(), f"final state {jax.tree_util.keystr(path)} differs"
    # The grain iterator state (next batch) saved with the last checkpoint, too.
    want_data = sorted((straight_dir / "checkpoints" / "12" / "data").glob("*.json"))
    assert want_data and [p.read_text() for p in want_data] == [
        (workdir / "checkpoints" / "12" / "data" / p.name).read_text() for p in want_data]


# ---------------------------------------------------------------------------- sharded ≡ unsharded

MESHES = {  # name: (data, fsdp, tensor); "1" runs on one device, the others on 8.
    "1": (1, 1, 1),
    "data=8": (8, 1, 1),
    "data=2,fsdp=2,tensor=2": (2, 2, 2),
    "fsdp=4,tensor=2": (1, 4, 2),
    "fsdp=8": (1, 8, 1),
    "data=2,fsdp=4": (2, 4, 1),
}
SHARDED_VOCAB = 300  # Padded to 384, which tensor=2 divides.


def sharded_table() -> dict:
    """Three train steps and the task metrics under each mesh of MESHES (needs 8 devices)."""
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    spec = LmTrain(model="tiny", seq_len=32, global_batch=8, num_steps=3,
                         learning_rate=1e-2, warmup_steps=1, eval_instances=64, tasks=TASKS)
    eos = 0
    tasks = [inject.build_task(t, SHARDED_VOCAB, reserved=(eos,)) for t in TASKS]
    injector = inject.Injector(tasks, spec.global_batch, spec.seq_len, eos)
    rng = np.random.default_rng(0)
    batches = [injector.inject(rng.integers(1, SHARDED_VOCAB, (8, 32), dtype=np.int32), t)[0]
               for t in range(3)]
    rows, reference = {}, None
    for name, sizes in MESHES.items():
        started = time.perf_counter()
        devices = jax.devices()[:1] if name == "1" else None
        mesh = sharding.make_mesh(MeshSpec(*sizes), devices=devices)
        program = train.LmModel(spec, SHARDED_VOCAB, mesh)
        state = program.init()
        init_digest = hashlib.sha256(b"".join(
            np.asarray(x).tobytes() for x in jax.tree.leaves(state["params"]))).hexdigest()
        head, embedding = state["params"]["head"], state["params"]["embedding"]
        layout = {  # Read now: train steps donate (delete) the state's buffers.
            "head": {"spec": str(head.sharding.spec), "global": list(head.shape),
                     "shard": list(head.addressable_shards[0].data.shape)},
            "embedding_shard": list(embedding.addressable_shards[0].data.shape)}
        # Meshes without "tensor" take the explicit-FSDP step (rareret/lm/fsdp.py): the
        # gradients are reduce-scattered in the program, not left to the partitioner.
        reduce_scatters = program.traced(lambda: program.train_step.lower(
            program.abstract_state(), jax.ShapeDtypeStruct(
                (8, 32), np.int32, sharding=program.batch_sharding)).as_text()).count(
            "reduce_scatter")
        opt_head_specs = sorted({str(x.sharding.spec) for path, x in
                                 jax.tree_util.tree_leaves_with_path(state["opt_state"])
                                 if jax.tree_util.keystr(path).endswith("['head']")})
        losses = []
        for batch in batches:
            state, loss = program.step(state, batch)
            losses.append(float(loss))
        measure = measurements.LmMeasurements(spec, program.config, mesh, tasks, eos,
                                              batches[0])
        metrics = jax.device_get(program.traced(
            measure.behaviour, state["params"], [5000] * len(tasks)))
        params = jax.tree.map(np.asarray, state["params"])
        reference = params if reference is None else reference
        rows[name] = {
            "devices": int(mesh.devices.size), "losses": losses,
            "task_loss": metrics["task_loss"].tolist(),
            "task_accuracy": metrics["task_accuracy"].tolist(),
            "init_digest": init_digest,
            "param_max_abs_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(
                jax.tree.leaves(params), jax.tree.leaves(reference))),
            **layout, "opt_head_specs": opt_head_specs, "reduce_scatters": reduce_scatters,
            "batch_shard": list(program.batch_sharding.shard_shape((8, 32))),
            "seconds": round(time.perf_counter() - started, 1),
        }
    header = f"{'mesh':24} {'dev':>3} {'step losses':>32} {'task_loss':>20} {'head shard':>10} " \
             f"{'max|Δparam|':>11} {'s':>5}"
    print(header, file=sys.stderr)
    for name, row in rows.items():
        print(f"{name:24} {row['devices']:>3} {' '.join(f'{x:.7f}' for x in row['losses']):>32} "
              f"{' '.join(f'{x:.6f}' for x in row['task_loss']):>20} "
              f"{'x'.join(map(str, row['head']['shard'])):>10} "
              f"{row['param_max_abs_diff']:>11.2e} {row['seconds']:>5}", file=sys.stderr)
    return rows


@pytest.fixture(scope="module", autouse=True)
def sharded_run(request, tmp_path_factory):
    """Starts `--sharded` in a subprocess (8 CPU devices) as soon as the module starts, if its
    test is selected, so its compiles (18 programs) overlap the other tests; the test waits.
    Output goes to files: a pipe nobody reads until the end could fill up and block it."""
    if not any(item.name == "test_sharded_matches_unsharded" for item in request.session.items):
        yield None
        return
    flags = f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    directory = tmp_path_factory.mktemp("sharded")
    with open(directory / "stdout", "w") as out, open(directory / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--sharded"], env=env, cwd=REPO,
                                stdout=out, stderr=err)
    yield proc, directory
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sharded_matches_unsharded(sharded_run):
    proc, directory = sharded_run
    proc.wait(timeout=300)
    stderr = (directory / "stderr").read_text()
    assert proc.returncode == 0, stderr[-5000:]
    lines = stderr.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("mesh ") and "dev" in line)
    print("\n" + "\n".join(lines[table:]))  # The table, for -s.
    rows = json.loads((directory / "stdout").read_text().strip().splitlines()[-1])
    assert list(rows) == list(MESHES)
    one = rows["1"]
    assert one["devices"] == 1 and one["head"]["shard"] == one["head"]["global"]
    vocab = train.padded_vocab(SHARDED_VOCAB)
    assert one["head"]["global"] == [32, vocab]
    for name, (data_size, fsdp, tensor) in MESHES.items():
        row = rows[name]
        for key in ("losses", "task_loss", "task_accuracy"):
            np.testing.assert_allclose(row[key], one[key], rtol=1e-5, atol=0,
                                       err_msg=f"mesh {name}: {key}")
        assert np.all(np.isfinite(row["losses"])), name
        # Same initial parameters wherever they are initialised, same ones after 3 steps.
        assert row["init_digest"] == one["init_digest"], f"mesh {name}: init differs"
        # Adam divides by √v, so an ulp-level gradient difference from another reduction order
        # moves a parameter by up to ~lr·(relative difference): measured ≤ 4e-5 at lr 1e-2.
        assert row["param_max_abs_diff"] < 1e-4, f"mesh {name}: {row['param_max_abs_diff']}"
        if name == "1":
            continue
        assert row["devices"] == 8
        # head [embed, vocab] → (fsdp, tensor); embedding [vocab, embed] → (tensor, fsdp).
        assert row["head"]["spec"] == str(PartitionSpec("fsdp", "tensor")), (name, row["head"])
        assert row["head"]["shard"] == [32 // fsdp, vocab // tensor], (name, row["head"])
        assert row["embedding_shard"] == [vocab // tensor, 32 // fsdp], name
        assert row["opt_head_specs"] == [row["head"]["spec"]], (name, row["opt_head_specs"])
        assert row["batch_shard"] == [8 // (data_size * fsdp), 32], name
        assert (row["reduce_scatters"] > 0) == (fsdp > 1 and tensor == 1), (name, row)
    # Every mesh but pure data parallelism really splits the parameters.
    assert [n for n, (_, f, t) in MESHES.items() if f * t > 1] == [
        n for n in MESHES if rows[n]["head"]["shard"] != rows[n]["head"]["global"]]


# ----------------------------------------------------------------------------- CLI

# tiny.gin shrunk to the RESUME schedule (same compiled programs, from the cache): records at
# 0 3 6 9 12, checkpoints at the first record past each multiple of 4: 6 9 12.
CLI_BINDINGS = ["LmTrain.seq_len = 32", "LmTrain.global_batch = 8", "LmTrain.num_steps = 12",
                "LmTrain.warmup_steps = 2", "LmTrain.record_every = 3",
                "LmTrain.checkpoint_every = 4", "LmTrain.eval_instances = 64"]


def cli_argv(workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "rareret.main", f"--gin_file={TINY_GIN}",
            *[f"--gin_bindings={b}" for b in CLI_BINDINGS], f"--workdir={workdir}",
            *map(str, extra)]


def cli_env() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **CACHE_ENV}
    env.pop("XLA_FLAGS", None)  # One CPU device, whatever the caller set.
    return env


def cli(workdir, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(cli_argv(workdir, *extra), cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def data_binding(path) -> str:
    return f"--gin_bindings=LmTrain.data = '{path}'"


def snapshot(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def assert_one_line_error(proc, *fragments) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("rareret: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def cli_run(shard, tmp_path_factory):
    """A finished CLI run (no tokenizer given: one is trained into the workdir); tests copy it."""
    workdir = tmp_path_factory.mktemp("cli") / "run"
    proc = cli(workdir, data_binding(shard))
    assert proc.returncode == 0, proc.stderr[-5000:]
    return workdir


def copy_run(run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(run, tmp_path / "run"))


def test_cli_run_writes_spec_metrics_checkpoints(cli_run, shard):
    spec = json.loads((cli_run / "spec.json").read_text())
    assert spec["experiment"] == "lm"
    assert spec["lm"]["num_steps"] == 12 and spec["lm"]["data"] == str(shard)
    assert [t["name"] for t in spec["lm"]["tasks"]] == ["cmp", "add"]  # From tiny.gin.
    assert "LmTrain.num_steps = 12\n" in (cli_run / "config.gin").read_text()
    assert data.load_tokenizer(cli_run / "tokenizer.json").get_vocab_size() == 512
    metrics = read_metrics(cli_run)
    assert metrics["step"].tolist() == [0, 3, 6, 9, 12]
    assert np.isnan(metrics["lm_loss"][0]) and np.all(np.isfinite(metrics["lm_loss"][1:]))
    assert metrics["task_loss"].shape == (5, 2)
    # Nothing is injected before step 0; by the end both tasks have been.
    assert np.all(np.isnan(metrics["task_loss"][0])) and np.all(np.isfinite(metrics["task_loss"][-1]))
    assert np.all(np.isfinite(metrics["val_loss"]))
    assert metrics["task_accuracy"].shape == (5, 2)
    assert checkpoint_steps(cli_run) == [9, 12]


def test_cli_rerun_of_a_finished_run_changes_nothing(cli_run, shard, tmp_path):
    workdir = copy_run(cli_run, tmp_path)
    before = read_metrics(workdir)
    proc = cli(workdir, data_binding(shard))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert_bit_identical(read_metrics(workdir), before, "metrics after a re-run")
    assert store.open_metrics(workdir / "metrics").committed_records == 5
    assert checkpoint_steps(workdir) == [9, 12]


def test_cli_resumes_a_run_that_crashed_before_its_last_checkpoint(cli_run, shard, tmp_path):
    """Checkpoint 12 removed: as if the run died after recording step 12 but before saving its
    checkpoint; it resumes from 9 and recomputes record 12."""
    workdir = copy_run(cli_run, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "12")
    proc = cli(workdir, data_binding(shard))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert read_metrics(workdir)["step"].tolist() == [0, 3, 6, 9, 12]  # Not duplicated.
    assert_bit_identical(read_metrics(workdir), read_metrics(cli_run), "metrics after resume")
    assert checkpoint_steps(workdir) == [9, 12]


def test_cli_refuses_a_different_config_and_touches_nothing(cli_run, shard, tmp_path):
    workdir = copy_run(cli_run, tmp_path)
    before = snapshot(workdir)
    proc = cli(workdir, data_binding(shard), "--gin_bindings=LmTrain.learning_rate = 1e-3")
    assert_one_line_error(proc, f"--workdir={workdir}", "different config", "--overwrite")
    assert snapshot(workdir) == before


def test_cli_overwrite_with_a_bad_mesh_keeps_the_old_run(cli_run, shard, tmp_path):
    workdir = copy_run(cli_run, tmp_path)
    before = snapshot(workdir)
    proc = cli(workdir, data_binding(shard), "--overwrite", "--gin_bindings=MeshSpec.data = 3")
    assert_one_line_error(proc, "mesh", "data=3")
    assert snapshot(workdir) == before


def test_cli_overwrite_with_a_corrupt_shard_keeps_the_old_run(cli_run, tmp_path):
    workdir = copy_run(cli_run, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\nnot json\n')
    before = snapshot(workdir)
    proc = cli(workdir, data_binding(bad), "--overwrite")
    assert_one_line_error(proc, f"{bad}:2")
    assert snapshot(workdir) == before


def write_bad_inputs(root: pathlib.Path) -> dict[str, tuple[list[str], list[str]]]:
    """name: (extra CLI arguments, fragments the one error line must hold)."""
    good = gzip.compress(b"".join(
        json.dumps({"id": d.id, "text": d.text}).encode() + b"\n" for d in golden_documents()),
        mtime=0)
    (root / "corrupt.json.gz").write_bytes(good[:len(good) // 2])  # Truncated mid-stream.
    (root / "not_json.jsonl").write_text(
        '{"id": "a", "text": "one"}\n\n{"id": "b", "text": "two"}\n{"id": "c", text: 3}\n')
    (root / "no_text.jsonl").write_text('{"id": "a", "text": "one"}\n{"id": "b", "txt": "x"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "two_docs.jsonl").write_text('{"id": "a", "text": "one two"}\n'
                                         '{"id": "b", "text": "three four five"}\n')
    tokens = np.zeros(1000, np.uint16)
    tokens[700] = 600
    np.save(root / "tokens.npy", tokens)
    return {
        "corrupt-gzip": ([data_binding(root / "corrupt.json.gz")],
                         [f"{root / 'corrupt.json.gz'}:", "unreadable"]),
        "not-json-line": ([data_binding(root / "not_json.jsonl")],
                          [f"{root / 'not_json.jsonl'}:4:", "not JSON"]),
        "missing-text": ([data_binding(root / "no_text.jsonl")],
                         [f"{root / 'no_text.jsonl'}:2:", "'text'"]),
        "empty-shard": ([data_binding(root / "empty.jsonl")],
                        [str(root / "empty.jsonl"), "empty shard"]),
        "token-id-too-big": ([data_binding(root / "tokens.npy"),
                              "--gin_bindings=LmTrain.vocab_size = 512",
                              "--gin_bindings=LmTrain.eos_id = 0"],
                             [str(root / "tokens.npy"), "600", "position 700", "512"]),
        "mesh-3-on-1-device": (["--gin_bindings=MeshSpec.data = 3"], ["mesh", "data=3"]),
        "warmup-past-the-end": (["--gin_bindings=LmTrain.warmup_steps = 30"],
                                ["LmTrain.warmup_steps=30", "num_steps=12"]),
        # With a tokenizer given, the corpus is built (and checked) before the workdir is.
        "corpus-too-small": ([data_binding(root / "two_docs.jsonl"),
                              f"--gin_bindings=LmTrain.tokenizer = '{TOKENIZER}'"],
                             ["packs into", "sequences of 32 tokens", "global_batch=8"]),
        "injection-over-capacity": ([f"--gin_bindings=LmTrain.tokenizer = '{TOKENIZER}'",
                                     "--gin_bindings=cmp/TaskSpec.frequency_per_token = 0.5"],
                                    ["TaskSpec 'cmp'", "frequency_per_token=0.5"]),
        # A tokenizer trained into the workdir, or the embedded corpus: still checked first.
        "over-capacity-on-the-default-corpus": (
            ["--gin_bindings=LmTrain.data = 'default'", "--gin_bindings=add/TaskSpec.every_n = 9"],
            ["TaskSpec 'add'", "every_n=9", "global_batch=8"]),
    }


@pytest.fixture(scope="module")
def bad_input_runs(shard, tmp_path_factory):
    """Every bad-input CLI call, started together (they only import and fail): name → proc."""
    root = tmp_path_factory.mktemp("bad")
    cases = write_bad_inputs(root)
    procs = {}
    for name, (extra, _) in cases.items():
        extra = [data_binding(shard), *extra]  # Later bindings win: the bad data replaces it.
        procs[name] = subprocess.Popen(cli_argv(root / f"run-{name}", *extra), cwd=REPO,
                                       env=cli_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                      cases[name][1])
    return done


@pytest.mark.parametrize("name", ["corrupt-gzip", "not-json-line", "missing-text", "empty-shard",
                                  "token-id-too-big", "mesh-3-on-1-device",
                                  "warmup-past-the-end", "corpus-too-small",
                                  "injection-over-capacity",
                                  "over-capacity-on-the-default-corpus"])
def test_cli_bad_input_is_one_line(bad_input_runs, name):
    proc, fragments = bad_input_runs[name]
    assert_one_line_error(proc, *fragments)
    assert "Traceback" not in proc.stderr
    workdir = next(a[len("--workdir="):] for a in proc.args if a.startswith("--workdir="))
    assert not os.path.exists(workdir)  # Checked before the workdir was created.


def test_cli_model_that_does_not_divide_over_the_mesh_fails_before_the_workdir(shard, tmp_path):
    """tensor=8 over 8 devices cannot shard the tiny model's 4 heads: refused before the
    workdir is created (the check needs the model's shapes, not the trained tokenizer)."""
    workdir = tmp_path / "run"
    env = {**cli_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(cli_argv(workdir, data_binding(shard), "--gin_bindings=MeshSpec.data = 1",
                                   "--gin_bindings=MeshSpec.tensor = 8"),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "not divisible by mesh axes", "tensor")
    assert not workdir.exists()


if __name__ == "__main__":
    if sys.argv[1:] == ["--sharded"]:
        print(json.dumps(sharded_table()))
    else:
        sys.exit(f"usage: {sys.argv[0]} --sharded")

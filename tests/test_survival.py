"""Runs that survive (synthetic sweep): kill -9 and SIGTERM resume bit-identically, SIGTERM
checkpoints at the last committed record whenever it arrives; a diverging model is frozen and
flagged while the others carry on unchanged."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lm_corpus import golden_documents
from rareret import store
from rareret.lm import data
from rareret.run import Run
from rareret.synthetic import sweep
from rareret.synthetic.spec import Sweep, TaskMixture
from xla_cache import FAST_COMPILE, persistent_compilation_cache

BINDINGS = [
    "TaskMixture.num_tasks = 6", "TaskMixture.task_dim = 4", "TaskMixture.input_dim = 32",
    "TaskMixture.beta = 1.5", "Sweep.widths = [2, 4, 8]", "Sweep.seeds = [0, 1]",
    "Sweep.batch_size = 128", "Sweep.num_steps = 2000", "Sweep.record_every = 100",
    "Sweep.checkpoint_every = 400", "Sweep.interference_every = 200",
    "run.injection = @Injection()", "Injection.gap = [20, 25]",
]
RECORDS = ("step", "train_loss", "task_loss", "alignment", "delta_f", "diverged",
           "interference", "interference_gram", "grad_norm", "rare_frequent_cosine")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The launches here (the same configs, over and over) take their compiled programs from
    one persistent cache, passed to them through the environment."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")) as cache_env:
        saved = {name: os.environ.get(name) for name in cache_env}
        os.environ.update(cache_env)
        yield
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def command(workdir):
    return [sys.executable, "-m", "rareret.main", "--noreport", f"--workdir={workdir}",
            *[f"--gin_bindings={b}" for b in BINDINGS]]


def committed(workdir) -> int:
    try:
        with open(os.path.join(workdir, "metrics", "zarr.json")) as f:
            return json.load(f)["attributes"]["committed_records"]
    except (OSError, ValueError, KeyError):
        return 0


def arrays(workdir) -> dict:
    metrics = store.open_metrics(os.path.join(workdir, "metrics"))
    out = {name: metrics.read(name) for name in RECORDS}
    out.update(retention_gain=metrics.read("retention_gain"),
               retention_decay=metrics.read("retention_decay"))
    return out


def run_until(workdir, records: int, sig: int) -> tuple[float, int, str]:
    """Starts the run, sends `sig` once `records` records are committed; (seconds to exit,
    exit status, stderr)."""
    proc = subprocess.Popen(command(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 240
        while committed(workdir) < records and proc.poll() is None:
            assert time.monotonic() < deadline, "run did not reach the kill point"
            time.sleep(0.05)
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read()}"
        sent = time.monotonic()
        proc.send_signal(sig)
        status = proc.wait(timeout=60)
        return time.monotonic() - sent, status, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def last_committed_step(workdir) -> int:
    return int(store.open_metrics(workdir / "metrics").read("step")[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run(command(workdir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return arrays(workdir)


def test_kill9_at_three_points_resumes_bit_identically(reference, tmp_path):
    workdir = tmp_path / "run"
    num_records = len(reference["step"])
    kills = [num_records // 6, num_records // 2, (5 * num_records) // 6]
    for records in kills:  # Kill, then resume and kill again further on.
        run_until(workdir, records, signal.SIGKILL)
    proc = subprocess.run(command(workdir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    resumed = arrays(workdir)
    for name, expected in reference.items():
        np.testing.assert_array_equal(resumed[name], expected, err_msg=name)
    print(f"kill -9 at {kills} committed records; {num_records} records compared bitwise")


def test_sigterm_checkpoints_at_the_last_record_exits_0_and_resumes(reference, tmp_path):
    workdir = tmp_path / "run"
    seconds, status, stderr = run_until(workdir, len(reference["step"]) // 3, signal.SIGTERM)
    assert status == 0 and seconds < 30, (status, seconds, stderr)
    step = last_committed_step(workdir)
    assert checkpoint_steps(workdir)[-1] == step
    assert f"preempted: checkpoint saved at step {step}, the last committed record" in stderr
    proc = subprocess.run(command(workdir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name, expected in arrays(workdir).items():
        np.testing.assert_array_equal(expected, reference[name], err_msg=name)
    print(f"SIGTERM → exit in {seconds:.2f} s, checkpoint at step {step}")


SIGNAL_MIXTURE = TaskMixture(num_tasks=4, task_dim=3, input_dim=16, beta=1.0)
SIGNAL_SWEEP = Sweep(widths=(2, 4), batch_size=32, num_steps=40, record_every=10,
                     checkpoint_every=100, warmup_steps=5)  # Checkpoints only at the end.


def run_signalled(workdir, monkeypatch=None, signal_at=None) -> bool:
    """Runs SIGNAL_SWEEP in-process (records committed at once); with `signal_at`, SIGTERM
    arrives while steps 10..19 train ("chunk") or while record 10 is fetched ("drain")."""
    program = sweep.SweepProgram(SIGNAL_MIXTURE, SIGNAL_SWEEP)
    if signal_at == "chunk":
        real_train = program.train

        def train(state, start, stop):
            if start == 10:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_train(state, start, stop)
        program.train = train
    elif signal_at == "drain":
        real_get = jax.device_get

        def device_get(tree):
            if isinstance(tree, dict) and int(tree.get("step", -1)) == 10:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_get(tree)
        monkeypatch.setattr(jax, "device_get", device_get)
    return Run(program, str(workdir), show_progress=False, record_delay=0).execute()


@pytest.mark.parametrize("signal_at", ["chunk", "drain"])
def test_sigterm_during_a_chunk_or_a_drain_checkpoints_at_the_next_record(
        tmp_path, monkeypatch, capsys, signal_at):
    """Whenever SIGTERM arrives, the chunk in flight finishes, its record is committed and the
    checkpoint is saved at that record (20: the chunk 10..19 was training, or record 10 was
    being fetched while it trained), never at a step without a record and never skipped."""
    straight = tmp_path / "straight"
    assert run_signalled(straight)
    workdir = tmp_path / "run"
    assert run_signalled(workdir, monkeypatch, signal_at) is False
    assert "preempted: checkpoint saved at step 20" in capsys.readouterr().err
    assert checkpoint_steps(workdir) == [20] and last_committed_step(workdir) == 20
    monkeypatch.undo()
    assert run_signalled(workdir)
    want, got = (store.open_metrics(d / "metrics") for d in (straight, workdir))
    for name in want.names():
        np.testing.assert_array_equal(got.read(name), want.read(name), err_msg=name)


MIXTURE = TaskMixture(num_tasks=4, task_dim=3, input_dim=16, beta=1.0)


def test_diverging_model_is_frozen_and_flagged(tmp_path):
    common = dict(widths=(2, 5), batch_size=64, num_steps=60, record_every=20, warmup_steps=5)
    # "sane" has the shapes of "both" (its programs come from the cache), no absurd rate.
    for name, rates in (("both", (1e-3, 1e30)), ("sane", (1e-3, 1e-3))):
        program = sweep.SweepProgram(MIXTURE, Sweep(learning_rate=rates, **common))
        Run(program, str(tmp_path / name), show_progress=False).execute()
    both = store.open_metrics(str(tmp_path / "both" / "metrics"))
    sane = store.open_metrics(str(tmp_path / "sane" / "metrics"))
    diverged = both.read("diverged")
    absurd = both.read("learning_rate") > 1
    assert diverged[-1, absurd].all() and not diverged[:, ~absurd].any()
    # Frozen at its last finite state (finite, if absurd: its metrics may overflow): its
    # records stop changing.
    np.testing.assert_array_equal(both.read("alignment")[-1, absurd],
                                  both.read("alignment")[-2, absurd])
    # The others match a run without the diverging model.
    assert not sane.read("diverged").any()
    np.testing.assert_allclose(both.read("task_loss")[:, ~absurd],
                               sane.read("task_loss")[:, ~absurd], rtol=1e-4, atol=1e-6)
    from rareret.analysis import report
    text = pathlib.Path(report.write_report(str(tmp_path / "both"))).read_text()
    assert "diverged" in text


def test_report_reads_a_run_that_is_still_writing(tmp_path):
    from rareret.analysis import phase, report
    workdir = tmp_path / "run"
    # Long enough that a loaded machine still writes several reports while it trains.
    proc = subprocess.Popen(command(workdir) + ["--gin_bindings=Sweep.num_steps = 8000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reports, seen = 0, []
    try:
        while committed(workdir) < 2 and proc.poll() is None:
            time.sleep(0.05)
        while proc.poll() is None:
            report.write_report(str(workdir))
            run = phase.SyntheticRun.load(str(workdir))
            steps = run.metrics.read("step")
            assert len(steps) == run.metrics.committed_records
            assert len(run.metrics.read("alignment")) == len(steps)
            assert np.all(np.diff(steps) > 0)
            seen.append(len(steps))
            reports += 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, proc.stderr.read()
    assert reports >= 2 and seen == sorted(seen), seen


LM_BINDINGS = ["LmTrain.seq_len = 32", "LmTrain.global_batch = 8", "LmTrain.num_steps = 48",
               "LmTrain.record_every = 4", "LmTrain.checkpoint_every = 8",
               "LmTrain.eval_instances = 64", "LmTrain.probe_every = 12",
               "LmTrain.interference_every = 16"]
LM_GIN = pathlib.Path(__file__).resolve().parents[1] / "gin_configs" / "lm" / "tiny.gin"
LM_TOKENIZER = pathlib.Path(__file__).resolve().parent / "data" / "lm_tokenizer.json"


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> list[str]:
    """Bindings for a small Dolma shard and its pre-trained tokenizer (tests/test_lm_train.py's),
    for a launch that need not build the embedded corpus and train a tokenizer first."""
    shard = data.write_shard(tmp_path_factory.mktemp("lm_corpus") / "golden.jsonl.gz",
                             golden_documents())
    return [f"LmTrain.data = '{shard}'", f"LmTrain.tokenizer = '{LM_TOKENIZER}'"]


def lm_env() -> dict:
    """Every LM launch's environment (`FAST_COMPILE`)."""
    return {**os.environ, "XLA_FLAGS": FAST_COMPILE}


def lm_command(workdir, *extra):
    """An LM run through the CLI; no report (what these tests read is the metrics)."""
    return [sys.executable, "-m", "rareret.main", f"--gin_file={LM_GIN}", f"--workdir={workdir}",
            "--noreport", *[f"--gin_bindings={b}" for b in LM_BINDINGS + list(extra)]]


def lm_arrays(workdir) -> dict:
    metrics = store.open_metrics(os.path.join(workdir, "metrics"))
    return {name: metrics.read(name) for name in metrics.names()}


def check_lm_evidence(workdir, arrays) -> None:
    """The LM evidence arrays land with their documented axes, measured exactly at their
    steps (tiny.gin: task 0 is T_CMP, task 1 T_ADD; probes every 12, interference every 16)."""
    metrics = store.open_metrics(os.path.join(workdir, "metrics"))
    axes = {"probe_r2": ("record", "task", "layer"), "fourier_modes": ("record", "task", "layer"),
            "fourier_power": ("record", "task", "layer", "frequency"),
            "mlp_ablation": ("record", "task", "block"), "grad_cosine": ("record", "task", "part"),
            "interference": ("record", "task_i", "task_j"), "val_loss": ("record",)}
    for name, names in axes.items():
        assert metrics.axes(name) == names, name
    steps = arrays["step"]
    probed, interfered = steps % 12 == 0, steps % 16 == 0
    assert np.all(np.isfinite(arrays["val_loss"]))
    assert np.all(np.isfinite(arrays["probe_r2"][probed, 0])) and np.all(
        np.isnan(arrays["probe_r2"][probed, 1]))
    assert np.all(np.isfinite(arrays["fourier_modes"][probed, 1]))
    assert np.all(np.isnan(arrays["probe_r2"][~probed])) and np.all(
        np.isnan(arrays["mlp_ablation"][~probed]))
    # The ablation needs injected instances: from the first probe after step 0 on.
    assert np.all(np.isfinite(arrays["mlp_ablation"][probed & (steps > 0)]))
    assert np.all(np.isfinite(arrays["interference"][interfered]))
    assert np.all(np.isnan(arrays["interference"][~interfered]))
    cosines = arrays["grad_cosine"][interfered][:, :, 0]  # cos(g, g_r): any batch.
    assert np.all(np.abs(cosines) <= 1)


def test_lm_kill9_at_three_points_resumes_bit_identically(tmp_path):
    # tiny.gin's own data (the embedded corpus, rewritten by every launch; a tokenizer trained
    # into the workdir): resuming over it is part of what is checked. The uninterrupted
    # reference runs beside the killed runs (nothing shared but the compilation cache), which
    # start once its first two records are in: by then it has compiled (and cached) the train
    # step and every measurement, so the two cores are not both compiling the same programs.
    reference = tmp_path / "reference"
    straight = subprocess.Popen(lm_command(reference), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=lm_env())
    try:
        while committed(reference) < 2 and straight.poll() is None:
            time.sleep(0.05)
        workdir = tmp_path / "run"
        for records in (3, 6, 10):  # Between checkpoints and right after them (of 13).
            proc = subprocess.Popen(lm_command(workdir), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=lm_env())
            try:
                while committed(workdir) < records and proc.poll() is None:
                    time.sleep(0.02)
                assert proc.poll() is None, "the run finished before it was killed"
                proc.kill()
            finally:
                proc.wait()
        proc = subprocess.run(lm_command(workdir), capture_output=True, text=True,
                              timeout=300, env=lm_env())
        assert proc.returncode == 0, proc.stderr
        _, stderr = straight.communicate(timeout=300)
        assert straight.returncode == 0, stderr
    finally:
        if straight.poll() is None:
            straight.kill()
            straight.wait()
    expected = lm_arrays(reference)
    check_lm_evidence(reference, expected)
    resumed = lm_arrays(workdir)
    for name, values in expected.items():
        np.testing.assert_array_equal(resumed[name], values, err_msg=name)


def test_lm_divergence_stops_with_a_diagnostic(tmp_path, lm_data):
    workdir = tmp_path / "run"
    proc = subprocess.run(lm_command(workdir, *lm_data, "LmTrain.learning_rate = 1e30",
                                     "LmTrain.clip_norm = 1e30"),
                          capture_output=True, text=True, timeout=300, env=lm_env())
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("rareret: error:")]
    assert len(lines) == 1 and "diverged" in lines[0] and "by step" in lines[0], proc.stderr
    # Only finite states were checkpointed, and the message names the latest one.
    steps = checkpoint_steps(workdir)
    assert lines[0].endswith(f"the last good checkpoint is step {steps[-1] if steps else None}")
    assert np.all(np.isfinite(lm_arrays(workdir)["lm_loss"][1:]))

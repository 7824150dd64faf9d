"""Multi-process LM training through the real CLI: two CPU processes (one device each, gloo
collectives over 127.0.0.1, `--distributed`) record the same metrics as one process with two
devices, and resume cooperatively from the orbax checkpoints they wrote together.

Both runs use the mesh fsdp=2, so the parameters and optimiser state are sharded across the two
processes (all-gathers and reduce-scatters go through gloo) and each process writes its own shards
of the checkpoint; the batch is split by rows (process p feeds rows [p·b, (p+1)·b) of each global
batch). Data: one small Dolma shard of pseudo-words (`lm_corpus.golden_documents`), and the
pre-trained `tests/data/lm_tokenizer.json` (byte-level BPE, 512), so every process reads the same
files and none writes any. All launches share a persistent XLA compilation cache.
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lm_corpus import golden_documents
from rareret import store
from rareret.lm import data
from xla_cache import FAST_COMPILE

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_GIN = REPO / "gin_configs/lm/tiny.gin"
TOKENIZER = REPO / "tests/data/lm_tokenizer.json"
TIMEOUT_S = 120  # Per launch; a healthy one takes ~15-25 s on two loaded cores.
METRICS = ("step", "lm_loss", "task_loss", "task_accuracy")
NUM_STEPS, RECORD_EVERY, CHECKPOINT_EVERY = 12, 4, 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(Dolma shard, tokenizer.json)."""
    shard = data.write_shard(tmp_path_factory.mktemp("lm_corpus") / "shard.jsonl.gz", golden_documents())
    return shard, TOKENIZER


def _bindings(corpus) -> list[str]:
    shard, tokenizer = corpus
    return [f"LmTrain.data = '{shard}'", f"LmTrain.tokenizer = '{tokenizer}'",
            "LmTrain.seq_len = 32", "LmTrain.global_batch = 8",
            f"LmTrain.num_steps = {NUM_STEPS}", f"LmTrain.record_every = {RECORD_EVERY}",
            f"LmTrain.checkpoint_every = {CHECKPOINT_EVERY}", "LmTrain.warmup_steps = 2",
            "LmTrain.eval_instances = 64", "MeshSpec.fsdp = 2"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, bindings, log, devices=1, process_id=None, port=None, extra=()):
    """A `python -m rareret.main` subprocess on CPU with `devices` local devices; `extra`
    bindings come after `bindings`."""
    argv = [sys.executable, "-m", "rareret.main", f"--gin_file={TINY_GIN}",
            *[f"--gin_bindings={b}" for b in (*bindings, *extra)], f"--workdir={workdir}",
            "--noreport"]
    if process_id is not None:
        argv += ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                 "--num_processes=2", f"--process_id={process_id}"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["JAX_PLATFORMS"] = "cpu"
    env.update(JAX_COMPILATION_CACHE_DIR=str(workdir.parent / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    out = open(log, "w")
    try:
        return subprocess.Popen(argv, cwd=workdir.parent, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()


def _pair(workdir):
    """The launches of one two-process run: (workdir, log, _launch keywords) for each process."""
    port = _free_port()
    return [(workdir, workdir.parent / f"{workdir.name}.process{pid}.log",
             dict(process_id=pid, port=port)) for pid in (0, 1)]


def _run(bindings, launches, timeout=TIMEOUT_S):
    """Starts every launch at once and waits for all to exit 0; a failure, or the deadline,
    kills the others (peers of a dead process would block in a collective) and fails the test
    with the logs. No process outlives this call."""
    procs_logs = []
    try:
        for workdir, log, keywords in launches:
            procs_logs.append((_launch(workdir, bindings, log, **keywords), log))
        deadline, pending = time.monotonic() + timeout, list(procs_logs)
        while pending:
            for proc, log in list(pending):
                if proc.poll() is not None:
                    pending.remove((proc, log))
                    if proc.returncode != 0:
                        _fail(procs_logs, f"{log.name} exited {proc.returncode}")
            if time.monotonic() > deadline:
                _fail(procs_logs, f"timed out after {timeout} s")
            time.sleep(0.1)
    finally:
        _kill(p for p, _ in procs_logs)


def _kill(procs):
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # Its own session: children go too.
            except ProcessLookupError:
                pass
            proc.wait()


def _fail(procs_logs, why):
    _kill(p for p, _ in procs_logs)
    logs = "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for _, log in procs_logs)
    pytest.fail(f"{why}\n{logs}")


def _metrics(workdir) -> dict[str, np.ndarray]:
    reader = store.open_metrics(workdir / "metrics")
    return {name: reader.read(name) for name in METRICS}


def _assert_same(got, want):
    for name in METRICS:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=0, equal_nan=True,
                                   err_msg=name)


def test_two_processes_match_one_process_with_two_devices_and_resume(corpus, tmp_path):
    bindings = _bindings(corpus)
    single, multi = tmp_path / "single", tmp_path / "multi"
    # All three processes at once: the single-process run shares nothing with the pair.
    _run(bindings, _pair(multi) + [(single, tmp_path / "single.log", dict(devices=2))])

    want, got = _metrics(single), _metrics(multi)
    steps = list(range(0, NUM_STEPS + 1, RECORD_EVERY))
    assert want["step"].tolist() == got["step"].tolist() == steps  # One writer: process 0.
    assert np.isnan(want["lm_loss"][0]) and np.all(np.isfinite(want["lm_loss"][1:]))
    assert want["task_loss"].shape == want["task_accuracy"].shape == (len(steps), 2)
    _assert_same(got, want)

    # Each process wrote its own grain iterator state and array shards into one checkpoint.
    last = multi / "checkpoints" / str(NUM_STEPS)
    assert sorted(p.name for p in (last / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert sorted(p.name for p in (last / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0", "ocdbt.process_1"]

    # Resume: without the last checkpoint both processes restore step 6 (sharded state, each
    # its own iterator state); the records after it are rolled back, recomputed, and equal.
    shutil.rmtree(last)
    _run(bindings, _pair(multi))
    _assert_same(_metrics(multi), want)
    assert (last / "data" / "process_1-of-2.json").is_file()


def test_bad_input_on_one_process_stops_every_process(corpus, tmp_path):
    """Process 1 cannot read its data (as when a file is missing on its host): it exits with its
    one-line error, and process 0, instead of waiting for it in a collective, exits at once
    with that error, naming process 1. Neither touches the workdir."""
    workdir = tmp_path / "run"
    missing = tmp_path / "not_on_this_host.jsonl.gz"
    launches = _pair(workdir)
    launches[1][2]["extra"] = (f"LmTrain.data = '{missing}'",)
    procs_logs = []
    try:
        for run_dir, log, keywords in launches:
            procs_logs.append((_launch(run_dir, _bindings(corpus), log, **keywords), log))
        for proc, _ in procs_logs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        _kill(p for p, _ in procs_logs)
    expected = f"LmTrain.data={missing}: no such file or directory"
    for pid, (proc, log) in enumerate(procs_logs):
        errors = [line for line in log.read_text().splitlines() if "error" in line.lower()]
        assert proc.returncode == 2, log.read_text()[-2000:]
        prefix = "" if pid == 1 else "process 1: "
        assert errors == [f"rareret: error: {prefix}{expected}"], errors
    assert not workdir.exists()

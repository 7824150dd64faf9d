"""A synthetic sweep over two CPU processes of two devices each (`--distributed`, gloo over
127.0.0.1) through the real CLI: its two data streams (rare-task multipliers 1 and 2) are split
over the processes and its 4 copies per width group over each process's 2 devices
(`sweep.model_mesh`); process 0 alone claims the workdir (with --overwrite: clears it once,
before any peer writes) and writes the metrics; both write their shards of the checkpoint; the
arrays equal a one-device run's to float32 rounding, and a resume repeats them bit for bit."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np

from rareret import store
from xla_cache import FAST_COMPILE, module_cache

REPO = pathlib.Path(__file__).resolve().parents[1]
BINDINGS = ["TaskMixture.num_tasks = 6", "TaskMixture.task_dim = 4",
            "TaskMixture.input_dim = 32", "Sweep.widths = [2, 4, 8]", "Sweep.seeds = [0, 1, 2, 3]",
            "Sweep.rare_multiplier = [1, 2]",
            "Sweep.batch_size = 64", "Sweep.num_steps = 300", "Sweep.record_every = 50",
            "Sweep.checkpoint_every = 100"]

RTOL, ATOL = 1e-5, 1e-7  # Measured: ≤ 2.4e-7 relative, 1.2e-7 absolute.


def argv(workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "rareret.main", f"--workdir={workdir}", "--noreport",
            "--noprogress", *[f"--gin_bindings={b}" for b in BINDINGS], *extra]


CACHE_ENV: dict[str, str] = {}
# The two two-process launches compile the same programs.
compilation_cache = module_cache(CACHE_ENV)


def env(devices: int = 1) -> dict:
    """Every launch's environment (LLVM's expensive passes off: short runs, compile-bound)."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", **CACHE_ENV,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir, *extra) -> None:
    port = free_port()
    procs = [subprocess.Popen(
        argv(workdir, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
             "--num_processes=2", f"--process_id={pid}", *extra),
        cwd=REPO, env=env(devices=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for pid in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]


def arrays(workdir) -> dict:
    metrics = store.open_metrics(pathlib.Path(workdir) / "metrics")
    return {name: metrics.read(name) for name in metrics.names()}


def test_two_process_sweep_equals_one_process_and_resumes(tmp_path):
    single = tmp_path / "single"
    proc = subprocess.run(argv(single), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = arrays(single)

    workdir = tmp_path / "two"  # Holds another run first: --overwrite must replace it once.
    proc = subprocess.run(argv(workdir, "--gin_bindings=Sweep.num_steps = 100"), cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_two_processes(workdir, "--overwrite")
    assert json.loads((workdir / "spec.json").read_text())["sweep"]["num_steps"] == 300
    got = arrays(workdir)
    assert sorted(got) == sorted(want)
    for name in want:
        # A device's encoder GEMM is narrower than the one device's (a quarter of the copies),
        # which may round a sum differently: float32 ulps, then carried through 300 steps.
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=name)

    # Resume both processes from the checkpoint at step 200 they wrote together.
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [200, 300]
    shutil.rmtree(workdir / "checkpoints" / "300")  # As if killed before its last save.
    run_two_processes(workdir)
    for name in want:  # The same split: bit for bit.
        np.testing.assert_array_equal(arrays(workdir)[name], got[name], err_msg=name)

"""The `rareret` CLI end to end: a tiny sweep, gin overrides, and one-line errors that leave the
workdir alone. Each call is a subprocess so absl flags and gin start fresh."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import zarr

from xla_cache import FAST_COMPILE, module_cache

DEFAULT_GIN = pathlib.Path(__file__).resolve().parents[1] / "gin_configs/synthetic/default.gin"
TINY = ["TaskMixture.num_tasks = 4", "TaskMixture.task_dim = 4", "TaskMixture.input_dim = 16",
        "Sweep.widths = [2, 4]", "Sweep.num_steps = 20", "Sweep.record_every = 10",
        "Sweep.batch_size = 64"]


CACHE_ENV: dict[str, str] = {}  # The persistent compilation cache, for every call.
compilation_cache = module_cache(CACHE_ENV)  # The runs compile the same tiny sweep.


def rareret(*args, cwd):
    argv = [sys.executable, "-m", "rareret.main", f"--gin_file={DEFAULT_GIN}"]
    argv += [f"--gin_bindings={b}" for b in TINY] + [str(a) for a in args]
    env = {**os.environ, **CACHE_ENV, "XLA_FLAGS": FAST_COMPILE}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def snapshot(root: pathlib.Path) -> dict:
    """Every path under `root` (or `root` itself if a file) with its bytes (None for folders)."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def steps(workdir) -> list:
    return zarr.open_group(str(workdir / "metrics"), mode="r")["step"][:].tolist()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished tiny run with its report; tests copy it rather than modify it."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    proc = rareret(f"--workdir={workdir}", cwd=workdir.parent)
    assert proc.returncode == 0, proc.stderr
    return workdir


def test_run_writes_config_spec_metrics_and_report(base_run):
    config = (base_run / "config.gin").read_text()
    assert "Sweep.num_steps = 20\n" in config and "Sweep.widths = [2, 4]\n" in config
    spec = json.loads((base_run / "spec.json").read_text())
    assert spec["experiment"] == "synthetic"
    assert spec["sweep"]["widths"] == [2, 4] and spec["mixture"]["input_dim"] == 16
    group = zarr.open_group(str(base_run / "metrics"), mode="r")
    assert group["step"][:].tolist() == [0, 10, 20]
    task_loss = group["task_loss"][:]
    assert task_loss.shape == (3, 2, 4) and np.all(np.isfinite(task_loss))
    for name in ("report.md", "phase_diagram.png", "curves.png"):
        assert (base_run / "report" / name).stat().st_size > 0


def test_gin_bindings_override_gin_file(base_run):
    assert "Sweep.num_steps = 25000" in DEFAULT_GIN.read_text()  # The binding in TINY wins.
    assert steps(base_run) == [0, 10, 20]


def test_gin_dot_flag_binds(tmp_path):
    proc = rareret("--gin.Sweep.num_steps=30", "--noreport", f"--workdir={tmp_path / 'run'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Sweep.num_steps = 30\n" in (tmp_path / "run" / "config.gin").read_text()
    assert steps(tmp_path / "run") == [0, 10, 20, 30]
    assert not (tmp_path / "run" / "report").exists()


BAD = [  # (arguments, text the error line must contain)
    (["--gin_bindings=Sweep.widthz = [2]"], "widthz"),
    (["--gin_bindings=Nope.x = 1"], "Nope"),
    (["--gin_file={tmp}/broken.gin"], "broken.gin"),
    (["--gin_file={tmp}/unclosed.gin"], "unclosed.gin"),
    (["--gin_bindings=run.vary_mixture = {{'beta': [0.5, -1.0]}}"], "beta=-1.0"),
    (["--gin_bindings=run.vary_mixture = {{'betaz': [0.5]}}"], "'betaz'"),
    (["--gin_file={tmp}/missing.gin"], "missing.gin"),
    (["--gin_bindings=run.injection = @Nope()"], "Nope"),
    (["--gin_bindings=run.injection = @Injection()", "--gin_bindings=Injection.gap = 0"],
     "Injection.gap: 0"),
    (["--gin_bindings=run.injection = @Injection()", "--gin_bindings=Injection.rate = 2.0"],
     "Injection.rate=2.0"),
    (["--gin_bindings=run.injection = @Injection()", "--gin_bindings=Injection.gap = 100000"],
     "Injection.gap=100000"),
    (["--gin_bindings=run.injection = @Injection()", "--gin_bindings=Injection.rare_task = 9"],
     "rare_task=9"),
    (["--gin_bindings=Sweep.batch_size = 0"], "batch_size=0"),
    (["--gin_bindings=Sweep.record_every = -5"], "record_every=-5"),
    (["--gin_bindings=Sweep.interference_mode = 'exact'"], "'exact'"),
    (["--gin_bindings=TaskMixture.complexity_range = (1, 99)"], "(1, 99)"),
    (["--gin_bindings=TaskMixture.priors = [1, 2]"], "priors"),
    (["--gin_bindings=run.experiment = 'lm'", "--gin_bindings=MeshSpec.data = 3",
      "--gin_bindings=LmTrain.mesh = @MeshSpec()"], "data=3"),
    (["--gin_bindings=run.experiment = 'lm'", "--gin_bindings=LmTrain.model = 'huge'"], "'huge'"),
    (["--gin_bindings=run.experiment = 'lm'", "--gin_bindings=LmTrain.data = '{tmp}/nope'"],
     "nope"),
    (["--gin_bindings=run.experiment = 'lm'",
      "--gin_bindings=LmTrain.tokenizer = '{tmp}/broken.gin'"], "broken.gin"),
    (["--gin_bindings=run.experiment = 'lm'", "--gin_bindings=LmTrain.seq_len = 2"],
     "seq_len=2"),
    (["--gin_bindings=run.experiment = 'lm'",
      "--gin_bindings=LmTrain.tasks = [@TaskSpec()]", "--gin_bindings=TaskSpec.kind = 'mul'",
      "--gin_bindings=TaskSpec.name = 'x'", "--gin_bindings=TaskSpec.every_n = 2"], "'mul'"),
    (["--gin_bindings=Sweep.widths = [2, 32]"], "width 32 exceeds"),
    (["--gin_bindings=TaskMixture.beta = -1"], "beta=-1"),
    (["--gin_bindings=Sweep.widths = []"], "widths=[]"),
    (["--gin_bindings=TaskMixture.input_dim = 8"], "input_dim=8"),
    (["--gin_bindings=Sweep.widths = [2, 2.5]"], "2.5"),
    (["--gin_bindings=Sweep.learning_rate = 0"], "learning_rate=0"),
    (["--gin_bindings=run.experiment = 'nope'"], "'nope'"),
    (["--gin_bindings=Sweep.num_steps = 30"], "--overwrite"),  # Holds a different run.
]


def check_one_line_error(proc, text):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rareret: error: "), proc.stderr
    assert text in lines[0] and "In call to configurable" not in lines[0]  # gin's context.


@pytest.mark.parametrize("args, text", BAD, ids=[c[1] if isinstance(c, tuple) else c.id
                                                  for c in BAD])
def test_bad_input_is_one_line_and_leaves_workdir_alone(base_run, tmp_path, args, text):
    (tmp_path / "broken.gin").write_text("Sweep.widths = = 3\n")
    (tmp_path / "unclosed.gin").write_text("Sweep.widths = [2\n")
    workdir = tmp_path / "run"
    shutil.copytree(base_run, workdir)
    before = snapshot(workdir)
    proc = rareret(*[a.format(tmp=tmp_path) for a in args], "--noreport", f"--workdir={workdir}",
                   cwd=tmp_path)
    check_one_line_error(proc, text)
    assert snapshot(workdir) == before


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"keep me\n")
    proc = rareret("--noreport", f"--workdir={path}", cwd=tmp_path)
    check_one_line_error(proc, f"--workdir={path}")
    assert path.read_bytes() == b"keep me\n"


def test_overwrite_replaces_the_old_run(base_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(base_run, workdir)
    proc = rareret("--gin.Sweep.num_steps=10", "--noreport", "--overwrite",
                   f"--workdir={workdir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert steps(workdir) == [0, 10]
    assert json.loads((workdir / "spec.json").read_text())["sweep"]["num_steps"] == 10
    assert not (workdir / "report").exists()  # The old run's report went with it.


def test_missing_workdir_fails(tmp_path):
    proc = rareret("--noreport", cwd=tmp_path)
    assert proc.returncode != 0
    assert "--workdir" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_mixture_variants_run_in_subdirs_and_refuse_before_touching(tmp_path):
    workdir = tmp_path / "betas"
    proc = rareret("--gin_bindings=run.vary_mixture = {'beta': [0.5, 2.0]}", "--noreport",
                   f"--workdir={workdir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert steps(workdir / "beta=0.5") == steps(workdir / "beta=2.0") == [0, 10, 20]
    before = snapshot(workdir)
    proc = rareret("--gin_bindings=run.vary_mixture = {'beta': [0.0, 2.0]}", "--noreport",
                   "--gin_bindings=Sweep.num_steps = 30", f"--workdir={workdir}", cwd=tmp_path)
    check_one_line_error(proc, "beta=2.0")  # beta=2.0/ holds a run with a different config.
    assert snapshot(workdir) == before  # beta=0.0/ was not created before the refusal.

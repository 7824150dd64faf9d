"""experiments/ and `rareret-experiments` (rareret/experiments.py, rareret/analysis/studies.py):
every CPU-scale config runs a few steps; the runner skips finished runs, reports a failed one
while the others carry on, and writes an index whose verdicts follow the numbers; the scaling-law
exponents match their closed forms."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from child_signals import terminate_once_training
from rareret.analysis import scaling_law, studies
from xla_cache import FAST_COMPILE

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
FEW_STEPS = {  # Bindings that cut every kind of run to a few steps.
    "synthetic": ["Sweep.num_steps = 24", "Sweep.record_every = 8", "Sweep.warmup_steps = 4",
                  "Sweep.checkpoint_every = 24"],
    "lm": ["LmTrain.num_steps = 4", "LmTrain.record_every = 2", "LmTrain.warmup_steps = 1",
           "LmTrain.checkpoint_every = 4", "LmTrain.eval_instances = 64"],
}
# Synthetic configs whose few-step runs only compile more width groups (up to 84 models, or
# 32 widths) along code paths the default config's run takes: `pytest -m slow` runs them, the
# default suite checks them with `--dry_run` (tests/test_levers_study.py runs a miniature of
# the levers study).
COMPILE_HEAVY = {"levers", "levers_replay", "levers_schedule", "rank1", "complexity",
                 "phase_beta", "long_horizon"}
JOBS = sorted({j for s in studies.STUDIES for j in s.cpu if j.config}, key=lambda j: j.name)
CPU_JOBS = [pytest.param(j, id=j.name, marks=[pytest.mark.slow] * (j.name in COMPILE_HEAVY))
            for j in JOBS]


def few_step_bindings(job) -> list[str]:
    text = (REPO / "experiments" / job.config).read_text()
    kind = "lm" if "gin_configs/lm/" in text else "synthetic"
    extra = []
    if kind == "synthetic" and "retention" in text:  # Gaps must fit the shortened run.
        extra = ["Injection.gap = [8]", "Sweep.interference_every = 8"]
    if kind == "lm" and "every_n" in text:
        extra = ["LmTrain.injection_window = 1"]
    return FEW_STEPS[kind] + extra


@pytest.mark.parametrize("job", CPU_JOBS)
def test_every_cpu_config_runs_a_few_steps(tmp_path, job):
    """Each CPU-scale config (a grid: its first cell) parses, validates and trains a few
    steps, leaving a finished run."""
    module = "rareret.grid" if job.grid else "rareret.main"
    argv = [sys.executable, "-m", module, f"--gin_file=experiments/{job.config}",
            f"--workdir={tmp_path / job.name}", "--noprogress", "--noreport",
            *(f"--gin_bindings={b}" for b in few_step_bindings(job))]
    if job.grid:
        argv.append("--cells=0")
    env = {**ENV, "XLA_FLAGS": FAST_COMPILE}
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    from rareret.analysis import grid_report
    run_dirs = ([d for d in (tmp_path / job.name).iterdir() if d.is_dir()] if job.grid
                else [tmp_path / job.name])
    assert any(grid_report.finished(str(d)) for d in run_dirs)


@pytest.mark.parametrize("job", [j for j in JOBS if j.name in COMPILE_HEAVY],
                         ids=lambda j: j.name)
def test_compile_heavy_configs_pass_a_dry_run(tmp_path, job):
    """Every input of the config is checked (a grid: its base config) and nothing is written."""
    result = subprocess.run(
        [sys.executable, "-m", "rareret.main", f"--gin_file=experiments/{job.config}",
         f"--workdir={tmp_path / job.name}", "--dry_run"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"dry run: would start {tmp_path / job.name}" in result.stdout
    assert not (tmp_path / job.name).exists()


RANK1 = """include '{repo}/gin_configs/synthetic/rank1.gin'
TaskMixture.num_tasks = 4
TaskMixture.input_dim = 4
Sweep.widths = [1, 2, 3, 4]
Sweep.batch_size = 256
Sweep.num_steps = {steps}
Sweep.record_every = {every}
Sweep.warmup_steps = 50
Sweep.learning_rate = 3e-2
"""


def experiments_dir(tmp_path, name, steps, every=None) -> pathlib.Path:
    """A copy of the rank-1 study's folder with a 4-task config of `steps` steps, recording
    every `every` (default: 4 records)."""
    folder = tmp_path / name / "rank1"
    folder.mkdir(parents=True)
    (folder / "cpu.gin").write_text(RANK1.format(repo=REPO, steps=steps,
                                                 every=every or max(steps // 4, 1)))
    return folder.parent


def experiments_cli(*args):
    argv = [sys.executable, "-m", "rareret.experiments", *map(str, args)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=ENV)


def index_row(root: pathlib.Path, study: str) -> str:
    return next(line for line in (root / "index.md").read_text().splitlines()
                if line.startswith(f"| [{study}]"))


def test_index_verdicts_follow_the_numbers_and_finished_runs_are_skipped(tmp_path):
    """A rank-1 run long enough gives N_emp(k) = k ("reproduced"); 2 steps learn nothing ("not
    reproduced"); a second invocation skips the finished run; computed studies need no run."""
    long_dir, short_dir = (experiments_dir(tmp_path, "long", 1500),
                           experiments_dir(tmp_path, "short", 2))
    root = tmp_path / "runs"
    done = experiments_cli("--only=rank1,scaling_law,lm_ladder", f"--experiments_dir={long_dir}",
                           f"--root={root}")
    assert done.returncode == 0, done.stderr[-3000:]
    row = index_row(root, "rank1")
    assert "N_emp(k) = k for 4/4 tasks" in row and "**reproduced**" in row, row
    assert "**reproduced**" in index_row(root, "lm_ladder")
    assert "N^−0.460" in index_row(root, "scaling_law")
    assert (root / "figures" / "rank1" / "rank1.png").is_file()
    again = experiments_cli("--only=rank1", f"--experiments_dir={long_dir}", f"--root={root}")
    assert again.returncode == 0 and "rank1: finished, skipped" in again.stdout

    short_root = tmp_path / "short_runs"
    short = experiments_cli("--only=rank1", f"--experiments_dir={short_dir}",
                            f"--root={short_root}")
    assert short.returncode == 0, short.stderr[-3000:]
    assert "**not reproduced**" in index_row(short_root, "rank1")


def test_a_failed_run_is_reported_and_the_others_carry_on(tmp_path):
    folder = experiments_dir(tmp_path, "broken", 10)
    (folder / "rank1" / "cpu.gin").write_text("Sweep.widths = 'wide'\n")
    root = tmp_path / "runs"
    result = experiments_cli("--only=rank1,lm_ladder", f"--experiments_dir={folder}",
                             f"--root={root}")
    assert result.returncode == 1
    assert "rank1: failed (exit status 2)" in result.stdout
    assert "**failed (exit status 2)**" in index_row(root, "rank1")
    assert "**reproduced**" in index_row(root, "lm_ladder")


def test_sigterm_checkpoints_the_running_job_and_stops(tmp_path):
    # Records every 100 steps: SIGTERM lets the chunk in flight finish (up to the next record),
    # which at the default 250,000 steps took most of a minute.
    folder = experiments_dir(tmp_path, "endless", 1_000_000, every=100)
    root = tmp_path / "runs"
    status, _, err = terminate_once_training(
        [sys.executable, "-m", "rareret.experiments", "--only=rank1,lm_ladder",
         f"--experiments_dir={folder}", f"--root={root}"], cwd=REPO, env=ENV)
    assert status == 0, err
    assert "preempted: checkpoint saved at step" in err
    assert "rareret-experiments: stopped in rank1; re-run the same command to resume" in err
    assert any((root / "rank1" / "checkpoints").iterdir())
    assert not (root / "index.md").exists()


def test_bad_study_name_is_one_line():
    result = experiments_cli("--only=nope", "--list")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rareret-experiments: error: --only: 'nope' is not a study; studies: "
        + ", ".join(s.name for s in studies.STUDIES)]


@pytest.mark.parametrize("alpha,beta", [(0.46, 0.51), (0.34, 0.28)])
def test_scaling_law_exponents_match_the_closed_forms(alpha, beta):
    """Along the compute-optimal frontier L − L0 = (1 + α/β)·A/N^α, so the fitted exponents are
    α in N and αβ/(α+β) in C, and the data term is the fraction α/(α+β) of it."""
    fit = scaling_law.exponents(scaling_law.ScalingLaw(alpha=alpha, beta=beta))
    assert fit.compute_optimal == pytest.approx(alpha, abs=2e-3)
    assert fit.compute_optimal_c == pytest.approx(alpha * beta / (alpha + beta), abs=2e-3)
    assert fit.infinite_data == pytest.approx(alpha, abs=1e-9)
    assert fit.gap_fraction == pytest.approx(alpha / (alpha + beta), abs=5e-3)


def test_first_crossing():
    steps = np.array([0, 10, 20, 30])
    assert studies.first_crossing(steps, np.array([np.nan, 0.2, 0.8, 0.9]), 0.75) == 20
    assert np.isnan(studies.first_crossing(steps, np.array([0.1, 0.2, 0.3, 0.4]), 0.75))

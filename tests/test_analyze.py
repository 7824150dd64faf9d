"""`rareret-analyze` (rareret/analysis/analyze.py) on a folder of runs in every state: finished,
partial, diverged (real sweeps), broken, without records, and an LM metric store (real arrays
of `measurements.record_specs`, made-up numbers)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from rareret import store
from rareret.analysis import analyze, open_run, phase
from rareret.lm import inject, ladder, measurements, train
from rareret.lm.spec import LmTrain
from rareret.run import Run
from rareret.synthetic.spec import Sweep, TaskMixture
from rareret.synthetic.sweep import SweepProgram
from test_open_run import compilation_cache  # noqa: F401 An autouse fixture: one compile here.

REPO = pathlib.Path(__file__).resolve().parents[1]
MIXTURE = TaskMixture(num_tasks=4, task_dim=2, input_dim=8, beta=1.0)
COMMON = dict(widths=(2, 4), batch_size=32, num_steps=20, record_every=10, warmup_steps=5)
# Per-model learning rates are data: all three sweeps run one compiled program.
FINISHED = Sweep(learning_rate=(1e-2, 2e-2), **COMMON)
DIVERGED = Sweep(learning_rate=(1e-2, 1e30), **COMMON)  # Adam steps of 1e30 overflow.
LM_TASKS = ("cmp", "add")


def sweep(workdir: pathlib.Path, spec: Sweep, advances: int | None = None) -> None:
    """Runs the sweep to its end, or stops it after `advances` records as a killed run would."""
    run = Run(SweepProgram(MIXTURE, spec), str(workdir), show_progress=False)
    if advances is None:
        run.execute()
        return
    run.start()
    try:
        for _ in range(advances):
            run.advance()
        run.commit()
    finally:
        run.close()


def lm_store(workdir: pathlib.Path) -> None:
    """An LM run's spec.json and metric store with records at steps 0 and 10."""
    spec = LmTrain(model="tiny", seq_len=32, global_batch=8, num_steps=10, warmup_steps=2,
                   record_every=10, probe_every=10, interference_every=10,
                   tasks=(inject.TaskSpec("cmp", "cmp", frequency_per_token=1e-3, seed=1),
                          inject.TaskSpec("add", "add", every_n=2, seed=2)))
    workdir.mkdir()
    (workdir / "spec.json").write_text(json.dumps(train.spec_dict(spec)))
    specs = measurements.record_specs(list(LM_TASKS), ladder.config_for("tiny").n_layers,
                                      True, True, False)
    rng = np.random.default_rng(0)
    rows = {name: rng.uniform(0.1, 0.9, (2, *s.row_shape)).astype(s.dtype)
            for name, s in specs.items()}
    rows["step"] = np.array([0, 10])
    rows["task_accuracy"] = np.array([[0.0, 0.0], [0.75, 0.25]], np.float32)
    store.MetricWriter.create(workdir / "metrics", specs).append(rows)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("runs")
    sweep(root / "finished", FINISHED)
    sweep(root / "diverged", DIVERGED)
    sweep(root / "partial", FINISHED, advances=1)
    (root / "broken" / "metrics").mkdir(parents=True)
    shutil.copy(root / "finished" / "spec.json", root / "broken" / "spec.json")
    (root / "broken" / "metrics" / "zarr.json").write_text("{not json")
    (root / "starting").mkdir()
    shutil.copy(root / "finished" / "spec.json", root / "starting" / "spec.json")
    lm_store(root / "lm")
    return root


def cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "rareret.analysis.analyze", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def runs_listed(stdout: str) -> dict[str, str]:
    """run → its line in the run list (the lines before the first table)."""
    listing = stdout.split("\n\n==")[0].splitlines()
    assert listing[0].split() == ["run", "experiment", "state", "progress", "settings"]
    return {line.split()[0]: line for line in listing[1:]}


def section(stdout: str, label: str, title_start: str) -> list[str]:
    for block in stdout.split("\n\n"):
        if block.startswith(f"== {label}: {title_start}"):
            return block.splitlines()[1:]
    raise AssertionError(f"no table {label}: {title_start}… in\n{stdout}")


def test_lists_every_run_with_its_state(root):
    proc = cli(root)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    listed = runs_listed(proc.stdout)
    assert sorted(listed) == ["broken", "diverged", "finished", "lm", "partial", "starting"]
    assert listed["finished"].split()[1:5] == ["synthetic", "finished", "step", "20/20,"]
    assert listed["partial"].split()[1:5] == ["synthetic", "partial", "step", "10/20,"]
    assert listed["diverged"].split()[1:3] == ["synthetic", "diverged"]
    assert "step 20/20, 3 records; 2/4 models diverged" in listed["diverged"]
    assert listed["broken"].split()[1:3] == ["synthetic", "broken"]
    assert "unreadable" in listed["broken"]
    assert listed["starting"].split()[1:4] == ["synthetic", "no", "records"]
    assert listed["lm"].split()[1:3] == ["lm", "finished"]
    assert "widths [2, 4], seeds [0], lr [0.01, 0.02]" in listed["finished"]
    # Tables for the readable runs only.
    for label in ("finished", "partial", "diverged"):
        section(proc.stdout, label, "critical widths")
    assert "== broken:" not in proc.stdout and "== starting:" not in proc.stdout
    frozen = section(proc.stdout, "diverged", "models frozen")
    assert [line.split()[:5] for line in frozen[2:]] == [["1", "2", "0", "1e+30", "0"],
                                                        ["3", "4", "0", "1e+30", "0"]]


def test_synthetic_tables_match_the_phase_comparison(root):
    comp = phase.compare_with_theory(phase.SyntheticRun.load(str(root / "finished")),
                                     learning_rate=np.float32(1e-2))
    run = analyze.inspect(str(root / "finished"), "finished")
    tables = {table.name: table.frame for table in analyze.run_tables(run)}
    assert list(tables) == ["critical_widths", "final_task_loss"]
    widths = tables["critical_widths"].xs(np.float32(1e-2), level="learning_rate")
    assert widths["observed"].tolist() == comp.observed_critical_K.tolist()
    assert widths["predicted"].tolist() == comp.predicted_critical_K.tolist()
    losses = tables["final_task_loss"].xs(np.float32(1e-2), level="learning_rate")
    np.testing.assert_allclose(losses.values, comp.observed_WxK.T)


def test_lm_tables(root):
    run = analyze.inspect(str(root / "lm"), "lm")
    tables = {table.name: table.frame for table in analyze.run_tables(run)}
    assert list(tables) == ["lm_loss", "task_metrics", "probes", "mlp_ablation", "grad_cosine",
                            "interference"]
    ds = open_run(root / "lm")
    metrics = tables["task_metrics"]
    assert metrics.index.tolist() == list(LM_TASKS)
    np.testing.assert_allclose(metrics["final task loss"], ds.task_loss[-1])
    assert metrics["first step accuracy ≥ 0.5"].tolist() == [10, pd.NA]
    assert tables["grad_cosine"].columns.tolist() == ["step", "all", "task_tokens",
                                                      "other_tokens"]
    assert tables["interference"].index.tolist() == [*LM_TASKS, "text"]
    np.testing.assert_allclose(tables["interference"].values, ds.interference[-1])
    probes = tables["probes"]
    assert probes.index.names == ["task", "layer"] and len(probes) == 2 * len(ds.layer)


def test_compare_aligns_the_runs(root):
    proc = cli(root / "finished", root / "diverged", "--compare", "--metric", "task_loss")
    assert proc.returncode == 0, proc.stderr
    lines = section(proc.stdout, "compare", "task_loss of the synthetic runs")
    assert lines[0].split() == ["run", "finished", "diverged"]
    assert lines[1].split() == ["learning_rate", "width", "task"]  # gap and seed: one value.
    finished, diverged = open_run(root / "finished"), open_run(root / "diverged")
    # Row lr 0.01, width 2, task 1: model 0 of both runs, side by side.
    assert lines[2].split() == ["0.01", "2", "1", f"{finished.task_loss[-1, 0, 0].item():.4g}",
                                f"{diverged.task_loss[-1, 0, 0].item():.4g}"]
    # lr 0.02 exists in `finished` only; 1e30 in `diverged` only, whose models hold NaN.
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 3 * 2 * 4
    assert all(row[-1] == "–" for row in rows if row[0] == "0.02")
    assert all(row[-2:] == ["–", "–"] for row in rows if row[0] == "1e+30")


def test_csv_and_netcdf_exports(root, tmp_path):
    assert analyze.main([str(root), "--csv", str(tmp_path / "csv"),
                         "--netcdf", str(tmp_path / "nc")]) == 0
    runs = pd.read_csv(tmp_path / "csv" / "runs.csv").set_index("run")
    assert runs.loc["broken", "state"] == "broken" and runs.loc["partial", "state"] == "partial"
    widths = pd.read_csv(tmp_path / "csv" / "critical_widths.csv")
    assert sorted(set(widths["run"])) == ["diverged", "finished", "partial"]
    assert sorted(os.listdir(tmp_path / "nc")) == ["diverged.nc", "finished.nc", "lm.nc",
                                                   "partial.nc"]
    back = xr.open_dataset(tmp_path / "nc" / "lm.nc", engine="scipy")
    np.testing.assert_array_equal(back.task_loss.values, open_run(root / "lm").task_loss.values)
    assert back.task.values.tolist() == list(LM_TASKS)


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere"], "{tmp}/nowhere: no such directory"),
    (["{tmp}"], "{tmp} holds no rareret run (no spec.json in it or below)"),
    (["{root}/finished", "--compare", "--metric", "nonsense"],
     "--metric nonsense: not a record array of these runs"),
])
def test_bad_input_is_one_line(root, tmp_path, args, message):
    proc = cli(*[a.format(tmp=tmp_path, root=root) for a in args])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"rareret-analyze: error: {message.format(tmp=tmp_path)}")


def test_console_scripts_are_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rareret-analyze"] == "rareret.analysis.analyze:run_main"
    assert scripts["rareret-export"] == "rareret.lm.export_cli:run_main"

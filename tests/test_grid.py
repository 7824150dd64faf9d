"""Grids (`rareret-grid`, rareret/grid.py): expansion into cells, a real local grid that skips
finished cells, reports a failed one and resumes, the SLURM and TPU scripts line by line, and the
combined report reading every cell."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest

from child_signals import terminate_once_training
from rareret import store
from rareret.analysis import grid_report
from rareret.errors import ConfigError
from rareret.grid import manifest
from rareret.grid_spec import Grid
from xla_cache import FAST_COMPILE, module_cache

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = f"""include '{REPO}/gin_configs/synthetic/default.gin'
TaskMixture.num_tasks = 4
TaskMixture.task_dim = 4
TaskMixture.input_dim = 16
Sweep.widths = [2, 4]
Sweep.num_steps = 20
Sweep.record_every = 10
Sweep.batch_size = 64
"""


CACHE_ENV: dict[str, str] = {}  # The persistent compilation cache, for every cell's process.
# The cells of a grid (and the grids) compile the same programs.
compilation_cache = module_cache(CACHE_ENV)


def grid_env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", **CACHE_ENV, "XLA_FLAGS": FAST_COMPILE}


def grid_cli(*args, cwd):
    argv = [sys.executable, "-m", "rareret.grid", *map(str, args)]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=grid_env())


def write_gin(tmp_path, name, axes) -> pathlib.Path:
    path = tmp_path / name
    path.write_text(TINY + f"Grid.axes = {axes}\n")
    return path


def grid_lines(text: str) -> list[str]:
    """The grid's own lines (the cells' rareret lines pass through between them)."""
    return [line for line in text.splitlines() if line.startswith("grid: ")]


def listing(root: pathlib.Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ----------------------------------------------------------------------------- expansion

def test_cells_are_the_product_named_by_coordinates():
    cells = Grid({"TaskMixture.beta": [0.5, 1.0], "Sweep.seeds": [[0], [1, 2]],
                  "LmTrain.model": ["cpu-small"]}).cells()
    assert [c.name for c in cells] == [
        "beta=0.5,seeds=0,model=cpu-small", "beta=0.5,seeds=1+2,model=cpu-small",
        "beta=1.0,seeds=0,model=cpu-small", "beta=1.0,seeds=1+2,model=cpu-small"]
    assert [c.index for c in cells] == [0, 1, 2, 3]
    assert cells[1].coords == {"beta": 0.5, "seeds": [1, 2], "model": "cpu-small"}
    assert cells[1].bindings == ["TaskMixture.beta = 0.5", "Sweep.seeds = [1, 2]",
                                 "LmTrain.model = 'cpu-small'"]


def test_labels_are_the_shortest_unambiguous_tails():
    grid = Grid({"cmp/TaskSpec.seed": [1], "add/TaskSpec.seed": [2, 3],
                 "cmp/TaskSpec.frequency_per_token": [1e-3, 2e-05], "Sweep.widths": [[]]})
    assert grid.labels() == {"cmp/TaskSpec.seed": "cmp.TaskSpec.seed",
                             "add/TaskSpec.seed": "add.TaskSpec.seed",
                             "cmp/TaskSpec.frequency_per_token": "frequency_per_token",
                             "Sweep.widths": "widths"}
    assert grid.cells()[3].name == ("cmp.TaskSpec.seed=1,add.TaskSpec.seed=3,"
                                    "frequency_per_token=2e-05,widths=empty")


@pytest.mark.parametrize("axes, text", [
    (None, "Grid.axes=None"),
    ({}, "Grid.axes={}"),
    ({"beta": [1]}, "'beta' is not a gin binding name"),
    ({"TaskMixture.beta": []}, "non-empty list"),
    ({"TaskMixture.beta": 0.5}, "non-empty list"),
    ({"LmTrain.data": ["a b"]}, "'a b' cannot name a cell"),
    ({"LmTrain.data": ["../x"]}, "'../x' cannot name a cell"),
    ({"LmTrain.data": [".."]}, "'..' cannot name a cell"),
    ({"run.vary_mixture": [{"beta": [1]}]}, "not a plain Python literal"),
    ({"TaskMixture.beta": [0.5, "0.5"]}, "several values are written 0.5"),
])
def test_bad_axes_are_refused(axes, text):
    with pytest.raises(ConfigError) as info:
        Grid(axes)
    assert text in str(info.value)


# ----------------------------------------------------------------------------- a real grid

def test_local_grid_runs_skips_reports_a_failure_and_resumes(tmp_path):
    gin_file = write_gin(tmp_path, "grid.gin",
                         "{'TaskMixture.beta': [0.5, 1.5], 'Sweep.seeds': [[0], [1]]}")
    workdir = tmp_path / "W"
    names = ["beta=0.5,seeds=0", "beta=0.5,seeds=1", "beta=1.5,seeds=0", "beta=1.5,seeds=1"]
    (workdir / names[3]).mkdir(parents=True)  # Holds another run: rareret refuses the cell.
    (workdir / names[3] / "spec.json").write_text('{"experiment": "synthetic"}')
    args = [f"--gin_file={gin_file}", f"--workdir={workdir}"]

    proc = grid_cli(*args, "--noreport", cwd=tmp_path)  # Reports: in the last run only.
    assert proc.returncode == 1, proc.stderr
    assert grid_lines(proc.stdout)[:2] == ["grid: cell 0 (beta=0.5,seeds=0): running",
                                            "grid: cell 1 (beta=0.5,seeds=1): running"]
    assert "grid: 4 cells: 4 run, 0 skipped, 1 failed" in proc.stdout
    failure = (f"grid: cell 3 (beta=1.5,seeds=1): failed (exit status 2): rareret: error: "
               f"--workdir={workdir / names[3]} already holds a run with a different config")
    assert proc.stderr.splitlines()[-1].startswith(failure), proc.stderr
    assert [grid_report.finished(str(workdir / n)) for n in names] == [True, True, True, False]
    record = json.loads((workdir / "grid.json").read_text())
    assert [c["name"] for c in record["cells"]] == names
    assert record["cells"][1]["coords"] == {"beta": 0.5, "seeds": [1]}
    spec = json.loads((workdir / names[2] / "spec.json").read_text())
    assert spec["mixture"]["beta"] == 1.5 and spec["sweep"]["seeds"] == [0]
    assert not (workdir / "grid_report").exists()
    lines = grid_cli(*args, "--dry_run", cwd=tmp_path).stdout.splitlines()
    assert len(lines) == 8
    assert lines[::2] == ["# cell 0 (beta=0.5,seeds=0): finished, skipped",
                          "# cell 1 (beta=0.5,seeds=1): finished, skipped",
                          "# cell 2 (beta=1.5,seeds=0): finished, skipped",
                          "# cell 3 (beta=1.5,seeds=1)"]
    assert lines[7] == shlex.join([
        sys.executable, "-m", "rareret.main", f"--gin_file={gin_file}",
        "--gin_bindings=TaskMixture.beta = 1.5", "--gin_bindings=Sweep.seeds = [1]",
        f"--workdir={workdir / names[3]}"])

    stamps = {n: os.stat(workdir / n / "metrics" / "zarr.json").st_mtime_ns for n in names[:3]}
    proc = grid_cli(*args, "--noreport", cwd=tmp_path)  # Finished cells skipped; failure stays.
    assert proc.returncode == 1, proc.stderr
    assert grid_lines(proc.stdout) == [
        "grid: cell 0 (beta=0.5,seeds=0): finished, skipped",
        "grid: cell 1 (beta=0.5,seeds=1): finished, skipped",
        "grid: cell 2 (beta=1.5,seeds=0): finished, skipped",
        "grid: cell 3 (beta=1.5,seeds=1): running", "grid: 4 cells: 1 run, 3 skipped, 1 failed"]
    assert {n: os.stat(workdir / n / "metrics" / "zarr.json").st_mtime_ns
            for n in names[:3]} == stamps

    (workdir / names[3] / "spec.json").unlink()
    proc = grid_cli(*args, cwd=tmp_path)  # Resumes: only the unfinished cell runs.
    assert proc.returncode == 0, proc.stderr
    assert "grid: 4 cells: 1 run, 3 skipped, 0 failed" in proc.stdout
    assert all(grid_report.finished(str(workdir / n)) for n in names)
    table = (workdir / "grid_report" / "grid.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == 4 and all(" | finished | " in row for row in rows)
    assert (workdir / "grid_report" / "phase_beta.png").stat().st_size > 0
    assert not (workdir / "grid_report" / "size_frequency.png").exists()

    other = write_gin(tmp_path, "other.gin", "{'TaskMixture.beta': [0.5, 2.0]}")
    before = listing(workdir)
    proc = grid_cli(f"--gin_file={other}", f"--workdir={workdir}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"rareret-grid: error: --workdir={workdir} holds another grid (its grid.json differs); "
        f"choose another workdir or pass --overwrite"]
    assert listing(workdir) == before


def test_sigterm_checkpoints_the_running_cell_and_stops_the_grid(tmp_path):
    gin_file = write_gin(tmp_path, "grid.gin", "{'TaskMixture.beta': [0.5, 1.5]}")
    workdir = tmp_path / "W"
    status, out, err = terminate_once_training(
        [sys.executable, "-m", "rareret.grid", f"--gin_file={gin_file}", f"--workdir={workdir}",
         "--gin_bindings=Sweep.num_steps = 1000000", "--gin_bindings=Sweep.record_every = 100",
         "--noreport"], cwd=tmp_path, env=grid_env())
    assert status == 0, err
    assert "preempted: checkpoint saved at step" in err
    assert "grid: stopped in cell 0 (beta=0.5); re-run the same command to resume" in err
    assert grid_lines(out) == ["grid: cell 0 (beta=0.5): running",
                               "grid: 2 cells: 1 run, 0 skipped, 0 failed"]
    assert any((workdir / "beta=0.5" / "checkpoints").iterdir())
    assert not (workdir / "beta=1.5").exists()


@pytest.mark.parametrize("binding, text", [
    ("Grid.axes = {'TaskMixture.betaz': [0.5]}", "cell 0 (betaz=0.5): --gin_bindings="
                                                 "'TaskMixture.betaz = 0.5'"),
    ("Grid.axes = {'Nope.x': [1]}", "cell 0 (x=1): --gin_bindings='Nope.x = 1'"),
    ("Grid.axes = {'TaskMixture.beta': [0.5, -1.0]}", "cell 1 (beta=-1.0): TaskMixture.beta=-1.0"),
    ("Grid.axes = {'LmTrain.model': ['huge']}", "'huge'"),
    ("run.vary_mixture = {'beta': [1.0]}", "run.vary_mixture is set"),
])
def test_bad_cells_are_refused_before_anything_is_written(tmp_path, binding, text):
    gin_file = write_gin(tmp_path, "grid.gin", "{'TaskMixture.beta': [0.5, 1.5]}")
    extra = ["--gin_bindings=run.experiment = 'lm'"] if "LmTrain" in binding else []
    proc = grid_cli(f"--gin_file={gin_file}", f"--gin_bindings={binding}", *extra,
                    f"--workdir={tmp_path / 'W'}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rareret-grid: error: "), proc.stderr
    assert text in lines[0]
    assert not (tmp_path / "W").exists()


# ----------------------------------------------------------------------------- cluster scripts

SIX = "{'TaskMixture.beta': [0.5, 1.0, 1.5], 'Sweep.seeds': [[0], [1]]}"


def test_tpu_dry_run_for_a_4_worker_slice(tmp_path):
    gin_file = write_gin(tmp_path, "grid.gin", SIX)
    base = [f"--gin_file={gin_file}", "--workdir=W", "--launch=tpu", "--tpu_name=pod",
            "--tpu_workers=4", "--dry_run"]
    proc = grid_cli(*base, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    remote = f"cd rareret && .venv/bin/rareret-grid --gin_file={gin_file} --workdir=W"
    assert proc.stdout.splitlines() == [
        "#!/bin/bash",
        "# 6 cells of W/grid.json on TPU pod: 4 workers, 1 per cell",
        f"gcloud compute tpus tpu-vm ssh pod --worker=0 --command='{remote} --cells=0,4' &",
        f"gcloud compute tpus tpu-vm ssh pod --worker=1 --command='{remote} --cells=1,5' &",
        f"gcloud compute tpus tpu-vm ssh pod --worker=2 --command='{remote} --cells=2' &",
        f"gcloud compute tpus tpu-vm ssh pod --worker=3 --command='{remote} --cells=3' &",
        "wait"]

    proc = grid_cli(*base, "--hosts_per_cell=2", "--tpu_hosts=h0,h1,h2,h3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == "# 6 cells of W/grid.json on TPU pod: 4 workers, 2 per cell"
    for worker, (cells, coordinator, rank) in enumerate(
            [("0,2,4", "h0", 0), ("0,2,4", "h0", 1), ("1,3,5", "h2", 0), ("1,3,5", "h2", 1)]):
        assert lines[2 + worker] == (
            f"gcloud compute tpus tpu-vm ssh pod --worker={worker} --command='{remote} "
            f"--cells={cells} --distributed --coordinator_address={coordinator}:8476 "
            f"--num_processes=2 --process_id={rank}' &")

    proc = grid_cli(*base, "--hosts_per_cell=4", cwd=tmp_path)  # The whole slice per cell.
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2:] == [
        f"gcloud compute tpus tpu-vm ssh pod --worker={w} --command='{remote} "
        f"--cells=0,1,2,3,4,5 --distributed' &" for w in range(4)] + ["wait"]

    proc = grid_cli(*base, "--hosts_per_cell=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "rareret-grid: error: --hosts_per_cell=3 must divide --tpu_workers=4"]
    assert sorted(os.listdir(tmp_path)) == ["grid.gin"]  # Dry runs write nothing.


def test_slurm_array_script(tmp_path):
    gin_file = write_gin(tmp_path, "grid.gin", SIX)
    base = [f"--gin_file={gin_file}", "--workdir=W", "--launch=slurm", "--noreport"]
    proc = grid_cli(*base, "--dry_run", "--sbatch=--gres=gpu:1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = [
        "#!/bin/bash",
        "#SBATCH --job-name=rareret-grid",
        "#SBATCH --array=0-5",
        f"#SBATCH --chdir={tmp_path}",
        "#SBATCH --output=W/slurm-%A_%a.out",
        "#SBATCH --gres=gpu:1",
        "# 6 cells of W/grid.json; task i runs cell i",
        f"{sys.executable} -m rareret.grid --gin_file={gin_file} --workdir=W --noreport "
        f"--cells=$SLURM_ARRAY_TASK_ID"]
    assert proc.stdout.splitlines() == expected
    assert sorted(os.listdir(tmp_path)) == ["grid.gin"]

    proc = grid_cli(*base, "--cells=1,4", cwd=tmp_path)  # Written, for some cells only.
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "wrote W/grid.slurm (2 cells); start it with: sbatch W/grid.slurm\n"
    script = (tmp_path / "W" / "grid.slurm").read_text().splitlines()
    assert script[2] == "#SBATCH --array=1,4"
    assert script[5] == "# 2 cells of W/grid.json; task i runs cell i"
    assert len(json.loads((tmp_path / "W" / "grid.json").read_text())["cells"]) == 6


# ----------------------------------------------------------------------------- the report

def fake_lm_cell(cell_dir: pathlib.Path, loss: list, accuracy: list, last: int = 10,
                 num_steps: int = 10):
    """An LM run of `num_steps` steps as rareret stores it: its spec, and records at 0 and
    `last`, the latter holding `loss` and `accuracy` per task (cmp, add)."""
    cell_dir.mkdir(parents=True)
    (cell_dir / "spec.json").write_text(json.dumps({"experiment": "lm",
                                                    "lm": {"num_steps": num_steps}}))
    tasks = {"tasks": ["cmp", "add"]}
    writer = store.MetricWriter.create(cell_dir / "metrics", {
        "step": store.RecordSpec((), np.int64, ()),
        "lm_loss": store.RecordSpec((), np.float32, ()),
        "task_loss": store.RecordSpec((2,), np.float32, ("task",), tasks),
        "task_accuracy": store.RecordSpec((2,), np.float32, ("task",), tasks)})
    writer.append({"step": np.array([0, last]), "lm_loss": np.array([9.0, 1.0]),
                   "task_loss": np.array([[9.0, 9.0], loss]),
                   "task_accuracy": np.array([[0.0, 0.0], accuracy])})


def test_size_frequency_heatmap_reads_every_cell(tmp_path):
    grid = Grid({"LmTrain.model": ["tiny", "cpu-small"],
                 "cmp/TaskSpec.frequency_per_token": [1e-3, 2e-3, 4e-3], "LmTrain.seed": [0, 1]})
    record = manifest(grid, ["base.gin"], [])
    workdir = tmp_path / "W"
    workdir.mkdir()
    (workdir / "grid.json").write_text(json.dumps(record))
    loss = np.zeros((2, 3, 2, 2))  # size, frequency, seed, task
    for cell in grid.cells():
        size, freq, seed = (["tiny", "cpu-small"].index(cell.coords["model"]),
                            [1e-3, 2e-3, 4e-3].index(cell.coords["frequency_per_token"]),
                            cell.coords["seed"])
        loss[size, freq, seed] = [cell.index, 100 + cell.index]
        fake_lm_cell(workdir / cell.name, loss[size, freq, seed], loss[size, freq, seed] / 200)

    path = grid_report.write_report(str(workdir))
    cells = grid_report.read_cells(str(workdir), record)
    sizes, freqs, tables, labels = grid_report.size_frequency(record, cells)
    assert (sizes, freqs, labels) == (["tiny", "cpu-small"], [1e-3, 2e-3, 4e-3],
                                      ("model", "frequency_per_token"))
    expected = loss.mean(axis=2)  # Averaged over seeds.
    np.testing.assert_allclose(tables["cmp"][0], expected[..., 0])
    np.testing.assert_allclose(tables["add"][0], expected[..., 1])
    np.testing.assert_allclose(tables["add"][1], expected[..., 1] / 200)
    assert (workdir / "grid_report" / "size_frequency.png").stat().st_size > 0
    rows = [line for line in open(path).read().splitlines() if line.startswith("| `")]
    assert len(rows) == 12
    assert rows[5] == ("| `model=tiny,frequency_per_token=0.004,seed=1` | tiny | 0.004 | 1 | "
                       "finished | 1 | 5 | 0.025 | 105 | 0.525 |")

    fake_lm_cell(workdir / "partial", [1.0, 1.0], [0.0, 0.0], last=10, num_steps=20)
    assert grid_report.cell_state(str(workdir / "partial")).step == 10
    assert not grid_report.finished(str(workdir / "partial"))
    assert not grid_report.finished(str(workdir / "missing"))

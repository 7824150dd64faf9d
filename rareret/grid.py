"""`rareret-grid`: one ordinary rareret run per cell of a grid (`Grid.axes`, rareret/grid_spec.py).

    rareret-grid --gin_file=experiments/phase_diagram/cpu.gin --workdir=W [--gin_bindings=...]
        [--launch=local|slurm|tpu] [--dry_run] [--cells=0,3] [--overwrite] [--noreport]

Every cell of every grid is checked first (gin names and spec values; nothing is written if one
is bad). W/grid.json (the manifest: axes, base config, cells) claims W; a W holding another grid
is refused unless --overwrite. `--launch=local` runs the cells one after another, each as a
subprocess `rareret ... --workdir=W/<cell>`, skipping finished cells; a failed cell is reported
and the others carry on (exit status 1 at the end). `--launch=slurm` writes W/grid.slurm (a job
array, one task per cell) and `--launch=tpu` W/grid.tpu.sh (one ssh command per worker of a pod
slice); `--dry_run` prints what would run and writes nothing. See docs/grids.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys

import gin
from absl import app, flags, logging

from rareret import cli_flags
from rareret import main as rareret_main
from rareret.child_process import ChildProcess
from rareret.analysis import grid_report
from rareret.errors import ConfigError, one_line, require
from rareret.grid_spec import Cell, Grid
from rareret.run import SPEC_FILE, check_workdir

FLAGS = flags.FLAGS  # rareret's flags (gin, workdir, overwrite, report, distributed, ...), and:
flags.adopt_module_key_flags(cli_flags)  # --dry_run, in --help.
flags.DEFINE_enum("launch", "local", ["local", "slurm", "tpu"],
                  "run the cells here, or write a SLURM job array or TPU pod-slice commands.")
flags.DEFINE_list("cells", None, "only these cell indices (the cluster scripts pass them).")
flags.DEFINE_multi_string("sbatch", [], "extra #SBATCH options for --launch=slurm, e.g. "
                          "--sbatch=--gres=gpu:1.")
flags.DEFINE_string("tpu_name", None, "TPU VM name, for --launch=tpu.")
flags.DEFINE_integer("tpu_workers", None, "hosts (workers) of the pod slice, for --launch=tpu.")
flags.DEFINE_integer("hosts_per_cell", 1, "hosts that run each cell together (--distributed).")
flags.DEFINE_list("tpu_hosts", None, "the workers' addresses, needed when 1 < hosts_per_cell < "
                  "tpu_workers (coordinator of each group of hosts).")
flags.DEFINE_string("tpu_dir", "rareret", "the repository's directory on the workers.")
flags.DEFINE_string("tpu_env", "", "environment assignments prefixed to each worker's command.")

MANIFEST = grid_report.MANIFEST
COORDINATOR_PORT = 8476


# ----------------------------------------------------------------------------- the grid

def read_grid() -> Grid:
    """The grid bound by the gin files and bindings."""
    rareret_main.parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    grid = gin.get_configurable("Grid")()
    gin.clear_config()
    return grid


def check_cell(cell: Cell) -> None:
    """Parses the cell's config and builds its specs: ConfigError naming the cell if a binding
    or value is bad."""
    try:
        rareret_main.parse_gin(FLAGS.gin_file, [*FLAGS.gin_bindings, *cell.bindings],
                               FLAGS.gin_search_paths)
        bound = gin.get_bindings("run", resolve_references=False)
        experiment = bound.get("experiment", "synthetic")
        require(experiment in rareret_main.EXPERIMENTS, f"run.experiment={experiment!r} is not "
                                                        f"one of {list(rareret_main.EXPERIMENTS)}")
        require(not bound.get("vary_mixture"), "run.vary_mixture is set; in a grid, vary the "
                                               "TaskMixture field as an axis (e.g. "
                                               "'TaskMixture.beta')")
        for name in ("LmTrain",) if experiment == "lm" else ("TaskMixture", "Sweep"):
            gin.get_configurable(name)()
    except ConfigError as e:
        raise ConfigError(f"cell {cell.index} ({cell.name}): {one_line(e)}") from e
    finally:
        gin.clear_config()


def gin_args() -> list[str]:
    """The base config's flags, as given."""
    paths = FLAGS.gin_search_paths
    return [*[f"--gin_search_paths={p}" for p in paths if paths != ["."]],
            *[f"--gin_file={f}" for f in FLAGS.gin_file],
            *[f"--gin_bindings={b}" for b in FLAGS.gin_bindings]]


def manifest(grid: Grid, gin_files: list[str], gin_bindings: list[str],
             search_paths: list[str] = (".",)) -> dict:
    """W/grid.json: what the grid is (axes, base config and the hashes of its gin files) and
    its cells."""
    def digest(path):
        for root in ("", *search_paths):
            if os.path.isfile(os.path.join(root, path)):
                with open(os.path.join(root, path), "rb") as f:
                    return hashlib.sha256(f.read()).hexdigest()

    record = {"axes": grid.axes, "labels": grid.labels(), "gin_files": list(gin_files),
              "gin_file_sha256": [digest(f) for f in gin_files],
              "gin_bindings": list(gin_bindings),
              "cells": [{"index": c.index, "name": c.name, "coords": c.coords,
                         "bindings": c.bindings} for c in grid.cells()]}
    return json.loads(json.dumps(record))


def check_manifest(workdir: str, record: dict, overwrite: bool) -> None:
    """ConfigError if `workdir` cannot hold the grid: not a writable directory, a run's
    workdir, or another grid's (unless `overwrite`)."""
    require(not os.path.exists(os.path.join(workdir, SPEC_FILE)),
            f"--workdir={workdir} holds a rareret run, not a grid; choose another workdir")
    check_workdir(workdir, {})
    path = os.path.join(workdir, MANIFEST)
    if os.path.exists(path) and not overwrite:
        held = grid_report.read_manifest(workdir)
        require(held == record, f"--workdir={workdir} holds another grid (its {MANIFEST} "
                                f"differs); choose another workdir or pass --overwrite")


def write_manifest(workdir: str, record: dict) -> None:
    """Writes W/grid.json atomically (processes writing the same grid race harmlessly)."""
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, f".{MANIFEST}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(workdir, MANIFEST))


def selected(cells: list[Cell]) -> list[Cell]:
    """The cells named by --cells (all by default)."""
    if FLAGS.cells is None:
        return cells
    indices = []
    for text in FLAGS.cells:
        require(text.isdigit() and int(text) < len(cells),
                f"--cells: {text!r} is not a cell index in 0..{len(cells) - 1}")
        indices.append(int(text))
    return [cells[i] for i in sorted(set(indices))]


def passed_flags() -> list[str]:
    """rareret flags every cell gets from this command."""
    out = [flag for flag, on in (("--overwrite", FLAGS.overwrite), ("--noreport", not FLAGS.report),
                                 ("--noprogress", not FLAGS.progress),
                                 ("--distributed", FLAGS.distributed)) if on]
    for name in ("coordinator_address", "num_processes", "process_id"):
        if FLAGS[name].value is not None:
            out.append(f"--{name}={FLAGS[name].value}")
    return out


# ----------------------------------------------------------------------------- local runs

def cell_argv(workdir: str, cell: Cell) -> list[str]:
    """The command that runs one cell: an ordinary rareret run in W/<cell>."""
    return [sys.executable, "-m", "rareret.main", *gin_args(),
            *[f"--gin_bindings={b}" for b in cell.bindings],
            f"--workdir={os.path.join(workdir, cell.name)}", *passed_flags()]


def run_local(workdir: str, cells: list[Cell]) -> bool:
    """Runs the cells in sequence, skipping finished ones; True unless a cell failed."""
    failed, ran, skipped = [], 0, 0
    for cell in cells:
        cell_dir = os.path.join(workdir, cell.name)
        head = f"grid: cell {cell.index} ({cell.name})"
        if not FLAGS.overwrite and grid_report.finished(cell_dir):
            print(f"{head}: finished, skipped", flush=True)
            skipped += 1
            continue
        print(f"{head}: running", flush=True)
        status, last = ChildProcess(cell_argv(workdir, cell)).run()
        ran += 1
        if status != 0:
            failed.append(f"{head}: failed (exit status {status}): {last}")
            print(failed[-1], file=sys.stderr, flush=True)
        if ChildProcess.signalled or (status == 0 and not grid_report.finished(cell_dir)):
            print(f"grid: stopped in cell {cell.index} ({cell.name}); re-run the same command "
                  f"to resume", file=sys.stderr)
            break
    print(f"grid: {len(cells)} cells: {ran} run, {skipped} skipped, {len(failed)} failed",
          flush=True)
    for line in failed:
        print(line, file=sys.stderr)
    return not failed


# ----------------------------------------------------------------------------- cluster scripts

def grid_argv(workdir: str, *extra: str) -> list[str]:
    """The rareret-grid arguments of this grid, less --cells (a cluster task never passes
    --overwrite: re-running it resumes)."""
    return [*gin_args(), f"--workdir={workdir}",
            *[f for f in passed_flags() if f != "--overwrite"], *extra]


def cells_flag(cells: list[Cell]) -> str:
    return f"--cells={','.join(str(c.index) for c in cells)}"


def slurm_script(workdir: str, cells: list[Cell], total: int) -> str:
    """An sbatch job array with one task per cell; task i runs cell i."""
    indices = [c.index for c in cells]
    array = f"0-{total - 1}" if indices == list(range(total)) else ",".join(map(str, indices))
    command = [sys.executable, "-m", "rareret.grid", *grid_argv(workdir)]
    lines = ["#!/bin/bash",
             "#SBATCH --job-name=rareret-grid",
             f"#SBATCH --array={array}",
             f"#SBATCH --chdir={os.getcwd()}",
             f"#SBATCH --output={os.path.join(workdir, 'slurm-%A_%a.out')}",
             *[f"#SBATCH {option}" for option in FLAGS.sbatch],
             f"# {len(cells)} cells of {os.path.join(workdir, MANIFEST)}; task i runs cell i",
             f"{shlex.join(command)} --cells=$SLURM_ARRAY_TASK_ID"]
    return "\n".join(lines) + "\n"


def tpu_script(workdir: str, cells: list[Cell]) -> str:
    """One `gcloud ... ssh --worker=i` command per worker, run in parallel: the workers form
    groups of --hosts_per_cell hosts, and the cells go round-robin over the groups."""
    name, workers, per_cell = FLAGS.tpu_name, FLAGS.tpu_workers, FLAGS.hosts_per_cell
    require(name, "--launch=tpu needs --tpu_name")
    require(workers is not None and workers >= 1, "--launch=tpu needs --tpu_workers ≥ 1")
    require(per_cell >= 1 and workers % per_cell == 0,
            f"--hosts_per_cell={per_cell} must divide --tpu_workers={workers}")
    groups = workers // per_cell
    hosts = FLAGS.tpu_hosts
    if 1 < per_cell < workers:
        require(hosts is not None and len(hosts) == workers,
                f"--hosts_per_cell={per_cell} < --tpu_workers={workers} needs --tpu_hosts with "
                f"the {workers} workers' addresses")
    lines = ["#!/bin/bash",
             f"# {len(cells)} cells of {os.path.join(workdir, MANIFEST)} on TPU {name}: "
             f"{workers} workers, {per_cell} per cell"]
    for worker in range(workers):
        group, rank = divmod(worker, per_cell)
        mine = cells[group::groups]
        if not mine:
            continue
        extra = []
        if per_cell == workers > 1:
            extra = ["--distributed"]  # The whole slice: JAX detects the TPU pod.
        elif per_cell > 1:
            extra = ["--distributed",
                     f"--coordinator_address={hosts[group * per_cell]}:{COORDINATOR_PORT}",
                     f"--num_processes={per_cell}", f"--process_id={rank}"]
        remote = " ".join(part for part in (
            f"cd {shlex.quote(FLAGS.tpu_dir)} &&", FLAGS.tpu_env,
            shlex.join([".venv/bin/rareret-grid", *grid_argv(workdir, cells_flag(mine), *extra)])) if part)
        lines.append(f"gcloud compute tpus tpu-vm ssh {shlex.quote(name)} --worker={worker} "
                     f"--command={shlex.quote(remote)} &")
    lines.append("wait")
    return "\n".join(lines) + "\n"


def launch_script(workdir: str, record: dict, cells: list[Cell], total: int) -> None:
    """Writes the manifest and the SLURM or TPU script (or with --dry_run prints the script)."""
    if FLAGS.launch == "slurm":
        text, file, how = slurm_script(workdir, cells, total), "grid.slurm", "sbatch"
    else:
        text, file, how = tpu_script(workdir, cells), "grid.tpu.sh", "bash"
    if cli_flags.DRY_RUN.value:
        print(text, end="")
        return
    write_manifest(workdir, record)
    path = os.path.join(workdir, file)
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path} ({len(cells)} cells); start it with: {how} {shlex.quote(path)}")


# ----------------------------------------------------------------------------- the command

def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        require(FLAGS.workdir, "--workdir is required")
        require(FLAGS.gin_file, "--gin_file is required (gin files binding Grid.axes)")
        grid = read_grid()
        cells = grid.cells()
        for cell in cells:
            check_cell(cell)
        chosen = selected(cells)
        workdir = FLAGS.workdir
        record = manifest(grid, FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
        check_manifest(workdir, record, FLAGS.overwrite)
        if FLAGS.launch != "local":
            launch_script(workdir, record, chosen, len(cells))
            return
    except ConfigError as e:
        print(f"rareret-grid: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    if cli_flags.DRY_RUN.value:
        for cell in chosen:
            done = not FLAGS.overwrite and grid_report.finished(os.path.join(workdir, cell.name))
            print(f"# cell {cell.index} ({cell.name}){': finished, skipped' if done else ''}")
            print(shlex.join(cell_argv(workdir, cell)))
        return
    write_manifest(workdir, record)
    ok = run_local(workdir, chosen)
    if FLAGS.report and FLAGS.cells is None:
        try:
            print(f"grid report: {grid_report.write_report(workdir)}")
        except ConfigError as e:
            print(f"rareret-grid: grid report failed: {one_line(e)}", file=sys.stderr)
    sys.exit(0 if ok else 1)


def run_main() -> None:
    app.run(main, argv=rareret_main.rewrite_gin_args(sys.argv))


if __name__ == "__main__":
    run_main()

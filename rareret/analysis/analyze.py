"""`rareret-analyze PATH…`: the rareret runs under the paths, their state, and their results as
tables (numpy, pandas and xarray; no JAX).

    rareret-analyze PATH… [--compare] [--metric NAME]… [--csv DIR] [--netcdf DIR]

A PATH is a run's workdir or any folder above runs (a `run.vary_mixture` sweep, a folder of
runs): every folder holding a spec.json is a run. The command lists the runs (experiment,
state, progress, key settings), then prints each readable run's tables, read with `open_run`
from the committed records, so it is safe on running runs:

  synthetic  critical_widths (observed vs predicted, per learning rate), final_task_loss
             (normalised, task × width, seeds averaged), and when the run recorded them:
             retention (per-cycle gain and decay of the rare task's s̃_r), gradients (rare vs
             frequent gradients), diverged (the frozen models)
  lm         lm_loss (final train and validation loss), task_metrics (final task loss and
             accuracy), and when recorded: probes (R², its null and Fourier modes per task ×
             layer), mlp_ablation, grad_cosine, interference, each at its last measured record

`--compare` prints instead one table per metric with the runs side by side as columns, rows
aligned on the metric's coordinates (an outer join: "–" where a run lacks the row): the final
record of record arrays, or `critical_width` (synthetic: observed and predicted). `--metric`
chooses them (default: critical_width and task_loss for synthetic runs; lm_loss, val_loss,
task_loss and task_accuracy for LM runs). `--csv DIR` writes every printed table to
DIR/<table>.csv (per-run tables stacked, with a `run` column; the run list as runs.csv);
`--netcdf DIR` writes each readable run's Dataset to DIR/<run>.nc.

States of a run:
  finished    its last committed record is at its last step
  partial     its committed records stop earlier: it is still running, was killed or preempted
              (re-running its command resumes it), or is an LM run stopped by divergence (the
              driver refuses a non-finite state before recording it, so on disk it looks the
              same; the run's `rareret: error` line named the step)
  diverged    a synthetic sweep with models frozen after a non-finite loss or gradient (the
              other models trained on); the progress column says whether it reached its end
  no records  a spec.json but no committed record yet (starting, or stopped during setup)
  broken      spec.json or the metric store is unreadable, or the experiment is unknown; the
              reason follows
Runs in any state are listed, never raised. A PATH that is not a folder or holds no run, or an
unknown --metric, ends the command with one line `rareret-analyze: error: …` and exit status 2.

Shapes: see docs/method.md "Shape letters": R records, M models, K tasks, W grid widths,
Y injection cycles.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
import pandas as pd
import xarray as xr

from rareret.analysis import phase, retention
from rareret.analysis.dataset import open_run, to_netcdf
from rareret.errors import ConfigError, one_line, require

PROG = "rareret-analyze"
EXPERIMENTS = ("synthetic", "lm")
COMPARE_DEFAULTS = {"synthetic": ("critical_width", "task_loss"),
                    "lm": ("lm_loss", "val_loss", "task_loss", "task_accuracy")}
SETTING_LEVELS = ["learning_rate", "gap", "width"]  # A sweep's models, seeds averaged.
LEARNED_ACCURACY = 0.5
CSV_FLOATS = "%.8g"  # The stored arrays are float32: 8 digits hold them whole.


@dataclasses.dataclass
class RunInfo:
    """One run found under the paths: its state, and its Dataset when readable."""

    path: str
    label: str
    experiment: str
    state: str
    progress: str
    settings: str = ""
    ds: xr.Dataset | None = None


@dataclasses.dataclass
class Table:
    name: str
    title: str
    frame: pd.DataFrame


# ----------------------------------------------------------------------------- finding runs

def find_runs(paths: list[str]) -> list[str]:
    """Every folder holding a spec.json at or below each path (runs hold no runs)."""
    runs = []
    for path in paths:
        require(os.path.isdir(path), f"{path}: no such directory")
        found = []
        for root, dirs, files in os.walk(path):
            if "spec.json" in files:
                found.append(os.path.normpath(root))
                dirs.clear()
            dirs.sort()
        require(found, f"{path} holds no rareret run (no spec.json in it or below)")
        runs += found
    return list(dict.fromkeys(runs))


def labels(runs: list[str]) -> list[str]:
    """Each run's path relative to the folder above all of them."""
    parents = [os.path.dirname(os.path.abspath(run)) for run in runs]
    root = os.path.commonpath(parents)
    return [os.path.relpath(os.path.abspath(run), root) for run in runs]


def inspect(path: str, label: str) -> RunInfo:
    """The run's state; its Dataset unless broken or without records."""
    try:
        spec = phase.read_spec(path)
    except ConfigError as e:
        return RunInfo(path, label, "?", "broken", one_line(e))
    experiment = str(spec.get("experiment"))
    if experiment not in EXPERIMENTS:
        return RunInfo(path, label, experiment, "broken",
                       f"experiment {experiment!r} is not one of {list(EXPERIMENTS)}")
    if not os.path.exists(os.path.join(path, "metrics")):
        return RunInfo(path, label, experiment, "no records", "no metric store yet")
    try:
        ds = open_run(path)
        settings = settings_text(spec)
        num_steps = spec["sweep" if experiment == "synthetic" else "lm"]["num_steps"]
    except Exception as e:  # noqa: BLE001 A damaged run is listed with the reason, never raised.
        return RunInfo(path, label, experiment, "broken", f"unreadable: {one_line(e)}")
    records = ds.sizes["record"]
    if not records:
        return RunInfo(path, label, experiment, "no records", "0 records", settings)
    last = int(ds.step[-1])
    state = "finished" if last >= num_steps else "partial"
    progress = f"step {last}/{num_steps}, {records} records"
    if "diverged" in ds and ds.diverged[-1].any():
        state = "diverged"
        progress += f"; {int(ds.diverged[-1].sum())}/{ds.sizes['model']} models diverged"
    return RunInfo(path, label, experiment, state, progress, settings, ds)


def settings_text(spec: dict) -> str:
    if spec["experiment"] == "synthetic":
        mixture, sweep, injection = spec["mixture"], spec["sweep"], spec.get("injection")
        text = (f"K={mixture['num_tasks']} d_T={mixture['task_dim']} D={mixture['input_dim']} "
                f"β={mixture['beta']} α={mixture['alpha']}; widths {sweep['widths']}, seeds "
                f"{sweep['seeds']}, lr {sweep['learning_rate']}, batch {sweep['batch_size']}")
        return text + (f"; injection gaps {injection['gap']}" if injection else "")
    lm = spec["lm"]
    tasks = [f"{t['name']} ({t['kind']})" for t in lm.get("tasks") or ()]
    return (f"model {lm['model']} ({lm['variant']}), batch {lm['global_batch']}×{lm['seq_len']}, "
            f"lr {lm['learning_rate']}; tasks: {', '.join(tasks) or 'none'}")


# ----------------------------------------------------------------------------- tables

def by_setting(ds: xr.Dataset, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per-model columns [M], averaged over seeds, indexed by learning rate, gap and width."""
    frame = pd.DataFrame({level: ds[level].values for level in SETTING_LEVELS} | columns)
    return frame.groupby(SETTING_LEVELS).mean()


def last_measured(da: xr.DataArray, dim: str | None = None) -> xr.DataArray:
    """`da` at its last record holding a finite value, separately per label of `dim` if given
    (NaN where never measured); the coordinate `step` says which record."""
    others = [d for d in da.dims if d not in ("record", dim)]
    finite = np.isfinite(da).any(others) if others else np.isfinite(da)
    last = finite.sizes["record"] - 1 - finite.isel(record=slice(None, None, -1)).astype(
        int).argmax("record")
    return da.isel(record=last).where(finite.any("record"))


def comparisons(run: RunInfo) -> dict[float, phase.PhaseComparison]:
    """Observed vs Theorem 3 per learning rate, from the Dataset's final task losses."""
    loaded = phase.SyntheticRun.load(run.path)
    final_MxK = run.ds.task_loss.isel(record=-1).values
    return {rate: phase.compare_with_theory(loaded, final_MxK, rate)
            for rate in sorted(set(run.ds.learning_rate.values.tolist()))}


def synthetic_tables(run: RunInfo) -> list[Table]:
    ds, comps = run.ds, comparisons(run)
    rows, losses = [], []
    for rate, comp in comps.items():
        for k in range(len(comp.staircase_K)):
            rows.append({"learning_rate": rate, "task": k + 1, "prior": float(ds.prior[k]),
                         "N*_k(1)": comp.staircase_K[k],
                         "predicted": comp.predicted_critical_K[k],
                         "observed": comp.observed_critical_K[k],
                         "grid steps off": comp.grid_steps_off()[k]})
        losses.append(pd.DataFrame(comp.observed_WxK.T, columns=pd.Index(comp.widths, name="width"),
                                   index=pd.MultiIndex.from_product(
                                       [[rate], ds.task.values], names=["learning_rate", "task"])))
    errors = ", ".join(f"{comp.mean_abs_error:.4f} (lr {rate:g})" for rate, comp in comps.items())
    tables = [
        Table("critical_widths", "critical widths, observed vs predicted (0 = none in the grid)",
              pd.DataFrame(rows).set_index(["learning_rate", "task"])),
        Table("final_task_loss", f"final normalised task loss ℓ_k/Tr C_k, seeds averaged; mean "
                                 f"|observed − Theorem 3| {errors}", pd.concat(losses))]
    if "retention_gain" in ds:
        tables.append(retention_table(run))
    if "rare_frequent_cosine" in ds:
        tables.append(gradient_table(ds))
    if ds.diverged[-1].any():
        tables.append(diverged_table(ds))
    return tables


def retention_table(run: RunInfo) -> Table:
    ds, loaded = run.ds, phase.SyntheticRun.load(run.path)
    rare = loaded.injection.rare(loaded.mixture)
    rare_RxM = retention.corrected_rare_alignment(ds.alignment.values, ds.width.values,
                                                  loaded.mixture.input_dim, rare)
    gain_YxM, decay_YxM = (pd.DataFrame(ds[name].values) for name in
                           ("retention_gain", "retention_decay"))
    frame = by_setting(ds, {"mean gain": gain_YxM.mean().values,
                            "mean decay": decay_YxM.mean().values,
                            "final s̃_r": rare_RxM[-1]})
    return Table("retention", f"retention of rare task {rare + 1}: per-cycle gain and decay of "
                              f"its corrected alignment s̃_r, averaged over cycles and seeds",
                 frame)


def gradient_table(ds: xr.Dataset) -> Table:
    cosine = last_measured(ds.rare_frequent_cosine)
    rare = ds.rare_frequent_cosine.attrs["rare_task"]
    norms_MxK = ds.grad_norm.swap_dims(record="step").sel(step=cosine.step)
    frame = by_setting(ds, {"cos(g_rare, g_F)": cosine.values,
                            "|g_rare|": norms_MxK[:, rare].values,
                            "mean |g_k| over F": norms_MxK[:, ds.frequent.values].mean(
                                "task").values})
    return Table("gradients", f"rare task {rare + 1} vs the frequent set F at step "
                              f"{int(cosine.step)} ({ds.grad_norm.attrs.get('mode')} gradients)",
                 frame)


def diverged_table(ds: xr.Dataset) -> Table:
    diverged_RxM = ds.diverged.values
    models = np.flatnonzero(diverged_RxM[-1])
    frame = pd.DataFrame({"model": models, "width": ds.width.values[models],
                          "seed": ds.seed.values[models],
                          "learning_rate": ds.learning_rate.values[models],
                          "gap": ds.gap.values[models],
                          "non-finite by step": ds.step.values[diverged_RxM[:, models].argmax(0)]})
    return Table("diverged", "models frozen after a non-finite loss or gradient",
                 frame.set_index("model"))


def lm_tables(run: RunInfo) -> list[Table]:
    ds = run.ds
    losses = pd.DataFrame({"train (since the previous record)": [float(ds.lm_loss[-1])],
                           "validation": [float(ds.val_loss[-1])]},
                          index=pd.Index([int(ds.step[-1])], name="step"))
    tables = [Table("lm_loss", "next-token loss at the last record", losses)]
    if not ds.sizes["task"]:
        return tables
    accuracy_RxK = ds.task_accuracy.values
    reached = [np.flatnonzero(accuracy_RxK[:, k] >= LEARNED_ACCURACY)
               for k in range(ds.sizes["task"])]
    metrics = pd.DataFrame({
        "kind": ds.kind.values, "final task loss": ds.task_loss[-1].values,
        "final accuracy": accuracy_RxK[-1],
        "best accuracy": pd.DataFrame(accuracy_RxK).max().values,  # NaN if never measured.
        f"first step accuracy ≥ {LEARNED_ACCURACY}": pd.array(
            [int(ds.step[r[0]]) if len(r) else None for r in reached], dtype="Int64")},
        index=pd.Index(ds.task.values, name="task"))
    tables.append(Table("task_metrics", "task loss (LABEL on injected train instances) and "
                                        "accuracy (held-out test instances)", metrics))
    if "probe_r2" in ds:
        probes = xr.Dataset({name: last_measured(ds[name], "task") for name in
                             ("probe_r2", "probe_r2_null", "fourier_modes")})
        tables.append(Table("probes", "representations per layer (0 = embeddings), at each "
                                      "task's last probed record",
                            probes.to_dataframe()[["step", "probe_r2", "probe_r2_null",
                                                   "fourier_modes"]]))
        tables.append(wide_table("mlp_ablation", "rise of the task loss with a block's MLP "
                                                 "output zeroed", ds.mlp_ablation, "block"))
    if "grad_cosine" in ds:
        tables.append(wide_table("grad_cosine", "cosine of the batch gradient with the task's "
                                                "reference gradient", ds.grad_cosine, "part"))
        matrix = last_measured(ds.interference)
        tables.append(Table("interference", f"cosines among the task gradients and the text "
                                            f"gradient at step {int(matrix.step)}",
                            matrix.drop_vars("step").to_pandas()))
    return tables


def wide_table(name: str, title: str, da: xr.DataArray, column: str) -> Table:
    """`da` [record, task, column] at each task's last measured record: tasks × column labels."""
    final = last_measured(da, "task")
    frame = final.drop_vars("step").to_pandas()
    frame.insert(0, "step", final.step.values)
    return Table(name, f"{title}, at each task's last measured record", frame)


def run_tables(run: RunInfo) -> list[Table]:
    tables = synthetic_tables(run) if run.experiment == "synthetic" else lm_tables(run)
    return [table for table in tables if len(table.frame)]


# ----------------------------------------------------------------------------- --compare

def compare_array(run: RunInfo, metric: str) -> xr.DataArray | None:
    """The run's final value of `metric`, labelled only by index coordinates; None if absent."""
    if metric == "critical_width":
        if run.experiment != "synthetic":
            return None
        comps = comparisons(run)
        values = [[comp.observed_critical_K, comp.predicted_critical_K] for comp in comps.values()]
        return xr.DataArray(np.transpose(values, (0, 2, 1)), dims=("learning_rate", "task", "source"),
                            coords={"learning_rate": list(comps), "task": run.ds.task.values,
                                    "source": ["observed", "predicted"]})
    if metric not in run.ds or "record" not in run.ds[metric].dims:
        return None
    final = run.ds[metric].isel(record=-1)
    if "model" in final.dims:
        final = final.set_index(model=[*SETTING_LEVELS, "seed"]).unstack("model").transpose(
            *SETTING_LEVELS, "seed", ...)
    return final.reset_coords(drop=True)


def compare_tables(runs: list[RunInfo], metrics: list[str] | None) -> list[Table]:
    """Per experiment and metric (default: `COMPARE_DEFAULTS`), the runs' final values side by
    side."""
    return [table for experiment in EXPERIMENTS
            for metric in metrics or COMPARE_DEFAULTS[experiment]
            if (table := compare_table([run for run in runs if run.experiment == experiment],
                                       experiment, metric)) is not None]


def compare_table(runs: list[RunInfo], experiment: str, metric: str) -> Table | None:
    arrays = {run.label: array for run in runs
              if (array := compare_array(run, metric)) is not None}
    if not arrays:
        return None
    def joined(values, **kwargs) -> xr.DataArray:
        return xr.concat(values, dim=pd.Index(list(arrays), name="run"), join="outer",
                         coords="minimal", **kwargs)

    combined = joined(list(arrays.values()))
    if combined.ndim == 1:
        frame = combined.to_pandas().to_frame(metric).T
    else:  # Rows of at least one run (a diverged model's NaN included).
        columns = [dim for dim in ("run", "source") if dim in combined.dims]
        present = joined([xr.ones_like(a, bool) for a in arrays.values()], fill_value=False)
        kept = present.any(columns).to_series()
        frame = combined.to_series().unstack(columns).loc[kept[kept].index]
    steps = ", ".join(f"{run.label} {int(run.ds.step[-1])}" for run in runs if run.label in arrays)
    return Table(f"compare_{experiment}_{metric}",
                 f"{metric} of the {experiment} runs, final record (steps: {steps})", frame)


def check_metrics(metrics: list[str], runs: list[RunInfo]) -> None:
    known = {"critical_width"} | {name for run in runs for name in run.ds.data_vars
                                  if "record" in run.ds[name].dims}
    unknown = [metric for metric in metrics if metric not in known]
    require(not unknown, f"--metric {', '.join(unknown)}: not a record array of these runs; "
                         f"they have {sorted(known)}")


# ----------------------------------------------------------------------------- output

def runs_frame(runs: list[RunInfo]) -> pd.DataFrame:
    return pd.DataFrame([{"run": run.label, "experiment": run.experiment, "state": run.state,
                          "progress": run.progress, "settings": run.settings} for run in runs])


def text_columns(frame: pd.DataFrame) -> str:
    """Left-aligned columns, for tables of text."""
    cells = [list(frame.columns)] + frame.astype(str).values.tolist()
    widths = [max(len(row[i]) for row in cells) for i in range(len(frame.columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in cells)


def printable(frame: pd.DataFrame) -> str:
    """The frame as text, without index levels that hold a single value."""
    if isinstance(frame.index, pd.MultiIndex):
        constant = [name for name in frame.index.names if frame.index.unique(name).size == 1]
        if len(constant) < frame.index.nlevels:
            frame = frame.droplevel(constant)
    frame = frame.rename(index=lambda v: f"{v:g}" if isinstance(v, float) else v)
    return frame.to_string(float_format=lambda v: f"{v:.4g}", na_rep="–")


def write_csv(directory: str, runs: list[RunInfo], per_run: dict[str, list[Table]],
              compared: list[Table]) -> None:
    os.makedirs(directory, exist_ok=True)
    runs_frame(runs).to_csv(os.path.join(directory, "runs.csv"), index=False)
    stacked: dict[str, list[pd.DataFrame]] = {}
    for label, tables in per_run.items():
        for table in tables:
            stacked.setdefault(table.name, []).append(
                table.frame.reset_index().assign(run=label).set_index("run").reset_index())
    for name, frames in stacked.items():
        pd.concat(frames).to_csv(os.path.join(directory, f"{name}.csv"), index=False,
                                 float_format=CSV_FLOATS)
    for table in compared:
        table.frame.to_csv(os.path.join(directory, f"{table.name}.csv"), float_format=CSV_FLOATS)


def write_netcdf(directory: str, runs: list[RunInfo]) -> None:
    os.makedirs(directory, exist_ok=True)
    for run in runs:
        if run.ds is not None:
            to_netcdf(run.ds, os.path.join(directory, run.label.replace(os.sep, "__") + ".nc"))


def analyze(args: argparse.Namespace, out=sys.stdout) -> None:
    paths = find_runs(args.paths)
    runs = [inspect(path, label) for path, label in zip(paths, labels(paths))]
    readable = [run for run in runs if run.ds is not None and run.ds.sizes["record"]]
    if args.metric:
        check_metrics(args.metric, readable)
    print(text_columns(runs_frame(runs)), file=out)
    per_run: dict[str, list[Table]] = {}
    compared: list[Table] = []
    if args.compare:
        compared = compare_tables(readable, args.metric)
        sections = [("compare", table) for table in compared]
    else:
        for run in readable:
            per_run[run.label] = run_tables(run)
        sections = [(label, table) for label, tables in per_run.items() for table in tables]
    for label, table in sections:
        print(f"\n== {label}: {table.title} ==\n{printable(table.frame)}", file=out)
    if args.csv:
        write_csv(args.csv, runs, per_run, compared)
    if args.netcdf:
        write_netcdf(args.netcdf, runs)


# ----------------------------------------------------------------------------- entry points

class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of the other rareret commands."""

    def error(self, message):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="List the rareret runs under PATHs and print their "
                                            "results as tables (committed records only).")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a run, or a folder above runs")
    parser.add_argument("--compare", action="store_true",
                        help="one table per metric with the runs side by side")
    parser.add_argument("--metric", action="append", default=None,
                        help="a record array (or critical_width) to compare; repeatable")
    parser.add_argument("--csv", metavar="DIR", help="write every table to DIR/<table>.csv")
    parser.add_argument("--netcdf", metavar="DIR", help="write each run to DIR/<run>.nc")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        analyze(build_parser().parse_args(argv))
    except ConfigError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def run_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run_main()

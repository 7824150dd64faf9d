"""Runs a synthetic sweep: trains a `SweepProgram` and streams its metrics into the run's arrays.

Writes `<workdir>/spec.json` and `<workdir>/metrics/` (see README "Outputs"). One record per
entry of `Sweep.record_steps`; interference arrays hold NaN at records that are not a multiple of
`Sweep.interference_every`. With an injection schedule, per-cycle `retention_gain` and
`retention_decay` [cycle, model] are written when the run ends.

Shapes: M models, K tasks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from rareret import store
from rareret.analysis import retention
from rareret.progress import Progress
from rareret.synthetic import sweep as sweep_lib
from rareret.synthetic import tasks, theory

INTERFERENCE = ("interference", "interference_gram", "grad_norm", "rare_frequent_cosine")


def record_specs(program: sweep_lib.SweepProgram) -> dict[str, store.RecordSpec]:
    M, K = program.layout.num_models, program.mixture.num_tasks
    specs = {
        "step": store.RecordSpec((), np.int64, (), {"description": "training steps taken"}),
        "train_loss": store.RecordSpec(
            (M,), np.float32, ("model",),
            {"description": "batch MSE averaged over the steps since the previous record"}),
        "task_loss": store.RecordSpec(
            (M, K), np.float32, ("model", "task"),
            {"description": "exact population loss / Tr(C_k) (1 = mean predictor)"}),
        "alignment": store.RecordSpec(
            (M, K), np.float32, ("model", "task"),
            {"description": "subspace alignment s_k = Tr(P_W C_k)/Tr(C_k)"}),
        "delta_f": store.RecordSpec(
            (M,), np.float32, ("model",),
            {"description": "residual common-task signal sum_{k in F} pi_k (1 - s_k) Tr(C_k)"}),
    }
    if program.sweep.interference_every:
        mode = {"mode": program.sweep.interference_mode, "every": program.sweep.interference_every,
                "missing": "NaN at records whose step is not a multiple of `every`"}
        specs.update({
            "interference": store.RecordSpec(
                (M, K, K), np.float32, ("model", "task_i", "task_j"),
                {**mode, "description": "cosine between per-task encoder gradients"}),
            "interference_gram": store.RecordSpec(
                (M, K, K), np.float32, ("model", "task_i", "task_j"),
                {**mode, "description": "inner products of per-task encoder gradients"}),
            "grad_norm": store.RecordSpec(
                (M, K), np.float32, ("model", "task"),
                {**mode, "description": "norm of each task's mean-loss encoder gradient"}),
            "rare_frequent_cosine": store.RecordSpec(
                (M,), np.float32, ("model",),
                {**mode, "rare_task": program.rare_task,
                 "description": "cosine between the rare task's gradient and the prior-weighted "
                                "gradient of the frequent set F"}),
        })
    return specs


def coordinate_arrays(program: sweep_lib.SweepProgram) -> dict[str, store.Coord]:
    mixture = program.mixture
    coords = {name: store.Coord(values, ("model",), {}) for name, values in program.coords.items()}
    coords["gap"] = store.Coord(program.coords["gap"], ("model",),
                                {"description": "injection gap G (0: i.i.d. prior, no injection)"})
    return {
        **coords,
        "prior": store.Coord(mixture.prior_array().astype(np.float32), ("task",), {}),
        "spectrum": store.Coord(mixture.spectra().astype(np.float32), ("task", "direction"), {}),
        "frequent": store.Coord(program.frequent_K, ("task",),
                                {"rule": "smallest top-prior task set with cumulative prior mass "
                                         f">= {theory.FREQUENT_MASS}"}),
    }


def write_spec(workdir: str, mixture: tasks.TaskMixture, sweep: sweep_lib.Sweep,
               injection: tasks.Injection | None) -> None:
    """Saves the specs as JSON so analysis can rebuild them without gin."""
    spec = {"experiment": "synthetic", "mixture": dataclasses.asdict(mixture),
            "sweep": dataclasses.asdict(sweep),
            "injection": dataclasses.asdict(injection) if injection else None}
    with open(os.path.join(workdir, "spec.json"), "w") as f:
        json.dump(spec, f, indent=2, default=list)


def run_sweep(mixture: tasks.TaskMixture, sweep: sweep_lib.Sweep, workdir: str,
              injection: tasks.Injection | None = None, show_progress: bool = True) -> None:
    """Trains every model of `sweep` and streams metrics into `<workdir>/metrics/`."""
    program = sweep_lib.SweepProgram(mixture, sweep, injection)
    os.makedirs(workdir, exist_ok=True)
    write_spec(workdir, mixture, sweep, injection)
    writer = store.MetricWriter.create(os.path.join(workdir, "metrics"), record_specs(program),
                                       coordinate_arrays(program), overwrite=True)
    params, opt_state = program.init()
    steps = sweep.record_steps(injection)
    progress = Progress(sweep.num_steps) if show_progress else None
    buffer = RecordBuffer(writer)
    train_loss_M = np.full(program.layout.num_models, np.nan, np.float32)
    nan_interference = {name: np.full(spec.row_shape, np.nan, np.float32)
                        for name, spec in record_specs(program).items() if name in INTERFERENCE}
    pending = None
    for index, step in enumerate(steps):
        if index > 0:  # Dispatched asynchronously: the host writes the last record meanwhile.
            params, opt_state, train_loss_M = program.train_chunk(
                params, opt_state, step - steps[index - 1], steps[index - 1])
        row = {"step": np.int64(step), "train_loss": train_loss_M, **program.evaluate(params)}
        if sweep.interference_every:
            row.update(program.interference(params, step) if step % sweep.interference_every == 0
                       else nan_interference)
        if pending is not None:
            buffer.add(jax.device_get(pending))
        pending = row
        if progress and index > 0:
            progress.update(steps[index - 1], buffer.summary)
    buffer.add(jax.device_get(pending))
    buffer.flush()
    if progress:
        progress.update(steps[-1], buffer.summary)
    if injection:
        write_retention(writer, program)


class RecordBuffer:
    """Collects records and appends them in batches, at most `max_delay` seconds late."""

    def __init__(self, writer: store.MetricWriter, max_delay: float = 2.0, max_rows: int = 64):
        self.writer, self.max_delay, self.max_rows = writer, max_delay, max_rows
        self.rows: list[dict] = []
        self.last_flush = time.monotonic()
        self.summary = ""

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.summary = f"mean task loss {np.mean(row['task_loss']):.3f}"
        if (len(self.rows) >= self.max_rows
                or time.monotonic() - self.last_flush >= self.max_delay):
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.append({name: np.stack([np.asarray(r[name]) for r in self.rows])
                                for name in self.rows[0]})
            self.rows = []
        self.last_flush = time.monotonic()


def write_retention(writer: store.MetricWriter, program: sweep_lib.SweepProgram) -> None:
    """Per-cycle gain and decay of the rare task's corrected alignment [cycle, model]."""
    metrics = store.open_metrics(writer.directory)
    rare_RxM = retention.corrected_rare_alignment(
        metrics.read("alignment"), program.coords["width"], program.mixture.input_dim,
        program.rare_task)
    cycles = program.sweep.num_steps // min(program.injection.gaps)
    gain, decay = retention.gain_and_decay(metrics.read("step"), rare_RxM, program.coords["gap"],
                                           cycles)
    note = {"rare_task": program.rare_task, "missing": "NaN past a model's last cycle"}
    writer.put_coord("retention_gain", gain, ("cycle", "model"),
                     {**note, "description": "jump of the rare task's corrected alignment at "
                                             "the cycle's injection"})
    writer.put_coord("retention_decay", decay, ("cycle", "model"),
                     {**note, "description": "drop of the rare task's corrected alignment "
                                             "from after this injection to before the next"})

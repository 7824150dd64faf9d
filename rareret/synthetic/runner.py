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
import sys
import time

import jax
import numpy as np

from rareret import store
from rareret.blas_threads import single_threaded_blas
from rareret.checkpoint import Checkpoints
from rareret.preemption import PreemptionGuard
from rareret.analysis import retention
from rareret.progress import Progress
from rareret.synthetic import sweep as sweep_lib
from rareret.synthetic import tasks, theory
from rareret.synthetic.spec import Injection, Sweep, TaskMixture


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
        "diverged": store.RecordSpec(
            (M,), bool, ("model",),
            {"description": "the model's loss or parameters became non-finite; it is frozen at "
                            "its last finite state"}),
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


def spec_dict(mixture: TaskMixture, sweep: Sweep,
              injection: Injection | None) -> dict:
    """The run's specs as plain JSON values (what `spec.json` holds)."""
    spec = {"experiment": "synthetic", "mixture": dataclasses.asdict(mixture),
            "sweep": dataclasses.asdict(sweep),
            "injection": dataclasses.asdict(injection) if injection else None}
    return json.loads(json.dumps(spec, default=list))


def run_sweep(mixture: TaskMixture, sweep: Sweep, workdir: str,
              injection: Injection | None = None, show_progress: bool = True) -> bool:
    """Trains every model of `sweep`, streaming metrics into `<workdir>/metrics/`.

    Resumes from the latest checkpoint in `<workdir>/checkpoints/` if there is one (records
    after it are rolled back and recomputed). On SIGTERM/SIGINT it commits the records, saves a
    checkpoint at the current record and returns False; it returns True once the run is done.
    """
    run = SweepRun(mixture, sweep, workdir, injection)
    progress = Progress(sweep.num_steps) if show_progress else None
    with PreemptionGuard() as guard, single_threaded_blas():
        while not run.done:
            run.advance(save=guard.requested)
            if guard.requested and not run.done:
                print(f"preempted: saved step {run.step}; re-run the same command to resume",
                      file=sys.stderr)
                run.close()
                return False
            if progress:
                progress.update(run.step, run.buffer.summary)
    run.close()
    return True


class SweepRun:
    """A sweep's training loop in a workdir, advanced one record at a time.

    Opening it starts the run (spec, arrays, the step-0 record) or resumes it from the latest
    checkpoint, rolling back the records after it. Each `advance` trains to the next record step
    and dispatches that record asynchronously; the host stores the previous record meanwhile.
    """

    def __init__(self, mixture: TaskMixture, sweep: Sweep, workdir: str,
                 injection: Injection | None = None):
        self.program = program = sweep_lib.SweepProgram(mixture, sweep, injection)
        os.makedirs(workdir, exist_ok=True)
        self.checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
        metrics_dir = os.path.join(workdir, "metrics")
        self.steps = sweep.record_steps(injection)
        latest = self.checkpoints.latest()
        if latest is None:
            with open(os.path.join(workdir, "spec.json"), "w") as f:
                json.dump(spec_dict(mixture, sweep, injection), f, indent=2)
            self.writer = store.MetricWriter.create(metrics_dir, record_specs(program),
                                                    coordinate_arrays(program), overwrite=True)
            self.state, self.index = program.init(), 0
            self.pending = program.record(
                self.state, 0, np.full(program.layout.num_models, np.nan, np.float32))
        else:
            self.state, _ = self.checkpoints.restore(latest, program.abstract_state())
            self.writer = store.MetricWriter.open(metrics_dir)
            self.index = self.steps.index(latest)
            # The record at the checkpoint is committed; later ones go.
            self.writer.truncate(self.index + 1)
            self.pending = None
        self.buffer = RecordBuffer(self.writer)
        self.last_saved = self.step

    @property
    def step(self) -> int:
        """Steps trained so far (the step of the latest record)."""
        return self.steps[self.index]

    @property
    def done(self) -> bool:
        return self.index == len(self.steps) - 1

    def advance(self, save: bool = False) -> None:
        """Trains to the next record step and records it. Commits every record and saves a
        checkpoint when `save`, at the last step, and past each multiple of checkpoint_every."""
        previous = self.step
        self.index += 1
        self.state, train_loss_M = self.program.train_chunk(
            self.state, self.step - previous, previous)
        row = self.program.record(self.state, self.step, train_loss_M)
        self.drain()
        self.pending = row
        every = self.program.sweep.checkpoint_every
        if save or self.done or self.step // every > self.last_saved // every:
            self.drain()
            self.buffer.flush()
            self.checkpoints.save(self.step, self.state)
            self.last_saved = self.step

    def drain(self) -> None:
        """Waits for the record in flight and hands it to the buffer."""
        if self.pending is not None:
            self.buffer.add(jax.device_get(self.pending))
            self.pending = None

    def close(self) -> None:
        """Commits every record; once the run is done, adds the retention arrays."""
        self.drain()
        self.buffer.flush()
        self.checkpoints.close()
        if self.done and self.program.injection:
            write_retention(self.writer, self.program)


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

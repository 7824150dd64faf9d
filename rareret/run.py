"""One run driver for every experiment: a `Program` says what to compute, a `Run` when and where.

A program (the synthetic sweep, the LM, ...) implements a few methods: its spec, its state
(`init`, `abstract_state`), `train(state, start, stop)`, `record(state, step)` and the arrays its
records fill. The `Run` owns everything else, the same for every program:

- the workdir: claimed only after every check has passed (a failed start leaves no trace); a
  workdir holding the same spec resumes, one holding another spec is refused unless `overwrite`;
  `spec.json` (the claim) and `config.gin` are written there;
- the schedule: it trains from record step to record step (`Program.record_steps`) and takes a
  record at each, fetching one record while the next chunk trains;
- records: buffered and appended to `<workdir>/metrics/` (process 0 only) at most a few seconds
  late, and always before a checkpoint;
- checkpoints (orbax, `<workdir>/checkpoints/`, with the program's data iterator): at the first
  record at or past each multiple of `checkpoint_every`, at the last step and on preemption, so
  a checkpoint's step is always a committed record's step; every process writes its shards;
- resume: from the latest checkpoint, rolling back the records after it, so a run killed at any
  point ends with the arrays of an uninterrupted run;
- preemption: SIGTERM / SIGINT finish the chunk in flight (up to the next record step), commit
  the records, checkpoint at that record and return; processes agree at every record;
- divergence: `Program.validate_state` can forbid saving a state (the LM stops, naming the last
  good checkpoint);
- progress: one line on stderr (process 0).
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from rareret import processes, store
from rareret.checkpoint import Checkpoints
from rareret.errors import ConfigError, require
from rareret.preemption import PreemptionGuard
from rareret.progress import Progress

SPEC_FILE = "spec.json"  # Present in every workdir that holds a run: the claim.
CONFIG_FILE = "config.gin"
METRICS_DIR = "metrics"
CHECKPOINTS_DIR = "checkpoints"
REPORT_DIR = "report"
RUN_FILES = (SPEC_FILE, CONFIG_FILE, METRICS_DIR, CHECKPOINTS_DIR, REPORT_DIR)


class Program(abc.ABC):
    """What an experiment computes. `Run` calls the methods in this order: `spec`,
    `record_steps`, `setup`, `init` or `abstract_state` (resume), then `train` / `record`
    alternately; `finish` once the last record is committed."""

    #: Steps between checkpoints (taken at the first record at or past each multiple).
    checkpoint_every: int
    #: Files or folders the program writes into the workdir (removed with the run).
    files: tuple[str, ...] = ()
    #: A grain iterator checkpointed with the state, or None.
    iterator: Any = None
    #: The device mesh the program runs on.
    mesh: jax.sharding.Mesh

    @abc.abstractmethod
    def spec(self) -> dict:
        """The run's spec as JSON values ("experiment" names the program); a workdir resumes
        only the same spec."""

    @abc.abstractmethod
    def record_steps(self) -> Sequence[int]:
        """Sorted steps at which a record is taken, from 0 to the last step."""

    @abc.abstractmethod
    def record_specs(self) -> dict[str, store.RecordSpec]:
        """The record arrays, `step` among them."""

    def coords(self) -> dict[str, store.Coord]:
        """Static coordinate arrays written when the store is created."""
        return {}

    def setup(self, workdir: str) -> None:
        """Called on every process once the workdir is claimed, before `init` / `restore`; may
        write the program's `files` (from process 0) and wait for them."""

    @abc.abstractmethod
    def init(self) -> Any:
        """The state at step 0."""

    @abc.abstractmethod
    def abstract_state(self) -> Any:
        """The structure (shapes, dtypes, shardings) of the state as checkpoints hold it
        (`checkpointed`): the restore target."""

    @abc.abstractmethod
    def train(self, state, start: int, stop: int) -> Any:
        """The state after training steps start … stop − 1 (may return before the device is
        done)."""

    @abc.abstractmethod
    def record(self, state, step: int) -> dict:
        """One record of `state` after `step` steps: a row per record array (device arrays are
        fetched later; nothing may alias state that the next `train` donates)."""

    def checkpointed(self, state) -> Any:
        """`state` as its checkpoints hold it (default: as it is)."""
        return state

    def resumed(self, saved) -> Any:
        """`checkpointed`'s inverse: the state to train on from a restored checkpoint."""
        return saved

    def running(self) -> contextlib.AbstractContextManager:
        """A context held open while the run trains (e.g. a thread limit)."""
        return contextlib.nullcontext()

    def validate_state(self, state) -> str | None:
        """Why `state` must not be saved or recorded (e.g. non-finite parameters), or None."""
        return None

    def summary(self, row: Mapping[str, np.ndarray]) -> str:
        """A short text for the progress line, from a fetched record."""
        return ""

    def finish(self, writer: store.MetricWriter) -> None:
        """Derived arrays, once every record is committed (process 0)."""


class TrainingDiverged(RuntimeError):
    """The program refused a state (`Program.validate_state`)."""


def check_workdir(workdir: str, spec: dict, overwrite: bool = False) -> bool:
    """Whether `workdir` holds the run `spec` to resume (True) or none (False); touches nothing.

    ConfigError if it is not a writable directory, or holds a different run and not `overwrite`.
    """
    require(not os.path.exists(workdir) or os.path.isdir(workdir),
            f"--workdir={workdir} exists and is not a directory")
    marker = os.path.join(workdir, SPEC_FILE)
    if os.path.exists(marker) and not overwrite:
        try:
            with open(marker) as f:
                held = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--workdir={workdir}: {SPEC_FILE} is unreadable ({e}); pass "
                              f"--overwrite to replace the run") from e
        require(held == spec, f"--workdir={workdir} already holds a run with a different "
                              f"config; choose another workdir or pass --overwrite to replace it")
        return True
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    require(os.access(existing, os.W_OK | os.X_OK),
            f"--workdir={workdir} is not writable ({existing} denies writing)")
    return False


def clear_workdir(workdir: str, files: Sequence[str] = ()) -> None:
    """Creates `workdir`, removing a run it held (its `RUN_FILES` and the program's `files`)."""
    for name in (*RUN_FILES, *files):
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} cannot be created: {e.strerror}") from e


class RecordBuffer:
    """Collects fetched records and appends them in batches, at most `max_delay` seconds late."""

    def __init__(self, writer: store.MetricWriter | None, max_delay: float = 2.0,
                 max_rows: int = 64):
        self.writer, self.max_delay, self.max_rows = writer, max_delay, max_rows
        self.rows: list[dict] = []
        self.last_flush = time.monotonic()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if (len(self.rows) >= self.max_rows
                or time.monotonic() - self.last_flush >= self.max_delay):
            self.flush()

    def flush(self) -> None:
        """Appends and commits every buffered record."""
        if self.rows and self.writer:
            self.writer.append({name: np.stack([np.asarray(r[name]) for r in self.rows])
                                for name in self.rows[0]})
        self.rows = []
        self.last_flush = time.monotonic()


class Run:
    """A program's run in a workdir. `Run(...)` checks everything and touches nothing;
    `execute()` claims the workdir, trains (or resumes) and returns True when the run is
    complete, False when it stopped early for preemption (re-running resumes it)."""

    def __init__(self, program: Program, workdir: str, *, overwrite: bool = False,
                 config_text: str | None = None, show_progress: bool = True,
                 record_delay: float = 2.0):
        """`record_delay`: seconds a record may wait in memory before it is committed (records
        are committed in batches; all of them before every checkpoint)."""
        self.program, self.workdir = program, workdir
        self.config_text, self.show_progress = config_text, show_progress
        self.record_delay = record_delay
        self.spec = json.loads(json.dumps(program.spec()))
        self.steps = [int(s) for s in program.record_steps()]
        require(self.steps and self.steps[0] == 0 and self.steps == sorted(set(self.steps)),
                f"{type(program).__name__}.record_steps must rise from 0, got {self.steps[:5]}")
        self.resuming = processes.agree(lambda: check_workdir(workdir, self.spec, overwrite))

    @property
    def metrics_dir(self) -> str:
        return os.path.join(self.workdir, METRICS_DIR)

    @property
    def step(self) -> int:
        """Steps trained so far (the step of the latest record)."""
        return self.steps[self.index]

    @property
    def done(self) -> bool:
        return self.index == len(self.steps) - 1

    def execute(self) -> bool:
        """Runs (or resumes) to the end: True, or False once preempted (SIGTERM / SIGINT)."""
        self.start()
        try:
            with PreemptionGuard() as guard, self.program.running():
                while not self.done:
                    self.advance(guard)
                    if self.preempted and not self.done:
                        print(f"preempted: checkpoint saved at step {self.step}, the last "
                              f"committed record; re-run the same command to resume",
                              file=sys.stderr)
                        return False
            self.finish()
            return True
        finally:
            self.close()

    def start(self) -> None:
        """Claims the workdir, sets the program up, and initialises or restores the state."""
        self._claim()
        self.program.setup(self.workdir)
        self.checkpoints = Checkpoints(os.path.join(self.workdir, CHECKPOINTS_DIR))
        self.state, self.index, self.pending = self._initial_state()
        self.buffer = RecordBuffer(self.writer, max_delay=self.record_delay)
        self.progress = (Progress(self.steps[-1])
                         if self.show_progress and processes.is_writer() else None)
        self.last_saved, self.summary, self.preempted = self.step, "", False

    def _claim(self) -> None:
        """Process 0 (re)creates the workdir and writes the claim; the others wait for it."""
        if processes.is_writer() and not self.resuming:
            clear_workdir(self.workdir, self.program.files)
            if self.config_text is not None:
                with open(os.path.join(self.workdir, CONFIG_FILE), "w") as f:
                    f.write(self.config_text)
            with open(os.path.join(self.workdir, SPEC_FILE), "w") as f:
                json.dump(self.spec, f, indent=2)
        processes.barrier("rareret.run: workdir claimed")

    def _initial_state(self):
        """(state, index of its record step, the step-0 record to store or None)."""
        program, writer_process = self.program, processes.is_writer()
        latest = self.checkpoints.latest()
        if latest is None:
            state = program.init()
            self.writer = (store.MetricWriter.create(self.metrics_dir, program.record_specs(),
                                                     program.coords(), overwrite=True)
                           if writer_process else None)
            return state, 0, program.record(state, 0)
        require(latest in self.steps, f"{self.workdir}: checkpoint step {latest} is not a record "
                                      f"step of this run; pass --overwrite to start again")
        state = program.resumed(self.checkpoints.restore(latest, program.abstract_state(),
                                                         program.iterator))
        self.writer = store.MetricWriter.open(self.metrics_dir) if writer_process else None
        if self.writer:  # The records after the checkpoint go; they are recomputed.
            steps = store.open_metrics(self.metrics_dir).read("step")
            self.writer.truncate(int(np.sum(steps <= latest)))
        return state, self.steps.index(latest), None

    def advance(self, guard: PreemptionGuard | None = None) -> None:
        """Trains to the next record step and records it; commits every record and saves a
        checkpoint there at the last step, past each multiple of `checkpoint_every`, and when
        the `guard` of any process was signalled by then (`preempted` is set)."""
        program, start, stop = self.program, self.step, self.steps[self.index + 1]
        self.state = program.train(self.state, start, stop)
        problem = program.validate_state(self.state)
        if problem:
            self.commit()
            raise TrainingDiverged(f"{problem} by step {stop}; the last good checkpoint is "
                                   f"step {self.checkpoints.latest()}")
        row = program.record(self.state, stop)
        self.fetch()  # The previous record, while this chunk and record run.
        self.pending, self.index = row, self.index + 1
        every = program.checkpoint_every
        self.preempted = processes.any_process(guard is not None and guard.requested)
        if self.preempted or self.done or stop // every > self.last_saved // every:
            self.commit()
            self.checkpoints.save(stop, program.checkpointed(self.state), program.iterator)
            self.last_saved = stop
        if self.progress:
            self.progress.update(stop, self.summary)

    def fetch(self) -> None:
        """Waits for the record in flight and hands it to the buffer."""
        if self.pending is not None and self.writer:
            row = jax.device_get(self.pending)
            self.buffer.add(row)
            self.summary = self.program.summary(row)
        self.pending = None

    def commit(self) -> None:
        """Fetches and commits every record taken so far."""
        self.fetch()
        self.buffer.flush()

    def finish(self) -> None:
        """Commits every record and, once the run is done, lets the program add its derived
        arrays."""
        self.commit()
        if self.writer and self.done:
            self.program.finish(self.writer)

    def close(self) -> None:
        """Releases the checkpoint manager (after `start`)."""
        self.checkpoints.close()

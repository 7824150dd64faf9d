"""Synthetic tasks T_CMP and T_ADD injected into LM training batches (docs/method.md §6.5-§6.8).

A task draws a set S of 100 tokens from the vocabulary (never a `reserved` id such as EOS) and a
random bijection val: S → {0..99}. An instance is (TOK1, TOK2, LABEL):
  T_CMP: LABEL is the True token if val(TOK1) < val(TOK2), else the False token (two further
    random tokens, distinct from S and from each other).
  T_ADD: LABEL is the token of S whose value is (val(TOK1) + val(TOK2)) mod 100.
Both tasks use all 100×100 ordered pairs as their 10,000 instances: pairs with TOK1 = TOK2 are
included (label False for T_CMP), since without them only 9,900 distinct pairs exist. The task
seed splits them 5,000/5,000 into train/test; only train instances are injected.

Injection writes TOK1 TOK2 LABEL EOS over the first 4 tokens of a training sequence, at most one
instance per sequence. What an `Injector` writes at step t is a pure function of (seeds, t):
  counts: a per-token frequency f means r = f·B·L instances per batch on average; step t gets
    ⌊(t+1)·r⌋ − ⌊t·r⌋, computed exactly (f is taken as the decimal it prints as), so steps 0..t
    hold ⌊(t+1)·r⌋ instances in all. The matched-frequency schedule "N every N" injects N
    instances at the steps t with t mod N = N−1 (the end of each N-step window), so steps 0..t
    hold N·⌊(t+1)/N⌋.
  instances: the i-th instance a task ever injects is train[perm_e[i mod 5000]], perm_e a
    permutation seeded by (task kind and seed, epoch e = i div 5000): each train instance once
    before any repeats.
  rows: a permutation of the B global rows seeded by (injector seed, t); its first rows go to
    the first task's instances, the next ones to the second task's, and so on.
The capacity check is conservative: the tasks' largest per-step counts must sum to at most B.
So f ≤ 1/L: the paper's T_ADD rates 7.8e-3 and 9.8e-4 at B = L = 1024 would need 8,179 and up to
1,028 instances per batch and are rejected (9.8e-4 reads as 1/1024 rounded, which fits exactly).

Evaluation (`eval_batch`): the model sees TOK1 TOK2 and predicts LABEL at position LABEL_POS = 2,
i.e. from the logits at position 1. Task loss is the cross-entropy of LABEL (split "train" for
the loss on injected instances). Report accuracy as argmax over the full vocabulary = LABEL on
the "test" split (the paper's accuracy of predicting LABEL); the argmax restricted to
`label_candidates` (chance 1/2 for T_CMP, 1/100 for T_ADD) is a secondary diagnostic.

Shapes: see docs/method.md "Shape letters": B global batch (in `eval_batch`, the instances
scored together), b per-process batch, L sequence length, I instance length; instance tables
[instances, 3] have no letter.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from rareret.errors import is_int, is_number, require, require_process_slice

KINDS = ("cmp", "add")
NUM_VALUES = 100  # |S|.
INSTANCE_LEN = 4  # TOK1 TOK2 LABEL EOS.
LABEL_POS = 2
_DEFINE, _ORDER, _ROWS = 0, 1, 2  # Seed-sequence tags: task definition, injection order, rows.


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One injected task. Set exactly one of `frequency_per_token` and `every_n`.

    Attributes:
      kind: "cmp" (T_CMP) or "add" (T_ADD).
      name: unique among the injected tasks; the key of `Injector.counts`.
      frequency_per_token: f in (0, 1); f·B·L instances per batch on average.
      every_n: N ≥ 1, the matched-frequency schedule: N instances every N batches.
      seed: with `kind`, seeds S, val, the label tokens, the train/test split and the injection
        order (tasks of equal kind and seed are identical).
    """

    kind: str
    name: str
    frequency_per_token: float | None = None
    every_n: int | None = None
    seed: int = 0

    def __post_init__(self):
        require(self.kind in KINDS, f"TaskSpec.kind={self.kind!r} must be one of {KINDS}")
        require(isinstance(self.name, str) and self.name != "",
                f"TaskSpec.name={self.name!r} must be a non-empty string")
        require((self.frequency_per_token is None) != (self.every_n is None),
                f"TaskSpec {self.name!r}: set exactly one of frequency_per_token="
                f"{self.frequency_per_token!r} and every_n={self.every_n!r}")
        f = self.frequency_per_token
        require(f is None or (is_number(f) and 0 < f < 1),
                f"TaskSpec {self.name!r}: frequency_per_token={f!r} must be in (0, 1)")
        require(self.every_n is None or (is_int(self.every_n) and self.every_n >= 1),
                f"TaskSpec {self.name!r}: every_n={self.every_n!r} must be an integer ≥ 1")
        require(is_int(self.seed) and self.seed >= 0,
                f"TaskSpec {self.name!r}: seed={self.seed!r} must be an integer ≥ 0")


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """A built task: tokens[i] ∈ S has value values[i]; rows of train/test are (TOK1, TOK2, LABEL).

    label_tokens is (True, False) for T_CMP and empty for T_ADD, whose labels are tokens of S.
    """

    spec: TaskSpec
    tokens: np.ndarray  # [100]
    values: np.ndarray  # [100]
    label_tokens: np.ndarray  # [2] or [0]
    train: np.ndarray  # [5000, 3]
    test: np.ndarray  # [5000, 3]


def build_task(spec: TaskSpec, vocab_size: int, reserved: Sequence[int] = ()) -> Task:
    """Draws S, val and the label tokens from ids in [0, vocab_size) minus `reserved`."""
    require(is_int(vocab_size) and vocab_size >= 1,
            f"build_task: vocab_size={vocab_size!r} must be an integer ≥ 1")
    require(all(is_int(r) and 0 <= r < vocab_size for r in reserved),
            f"build_task: reserved={list(reserved)!r} must be token ids in [0, {vocab_size})")
    pool = np.setdiff1d(np.arange(vocab_size), np.asarray(reserved, dtype=np.int64))
    need = NUM_VALUES + (2 if spec.kind == "cmp" else 0)
    require(pool.size >= need,
            f"build_task: vocab_size={vocab_size} leaves {pool.size} unreserved tokens; task "
            f"{spec.name!r} needs ≥ {need}")
    rng = np.random.default_rng(_seed_words(spec, _DEFINE))
    drawn = rng.choice(pool, size=need, replace=False)
    tokens, label_tokens = drawn[:NUM_VALUES], drawn[NUM_VALUES:]
    values = rng.permutation(NUM_VALUES)
    first, second = np.divmod(np.arange(NUM_VALUES**2), NUM_VALUES)
    labels = _labels(spec.kind, tokens, values, label_tokens, values[first], values[second])
    instances = np.stack([tokens[first], tokens[second], labels], axis=1)  # [10000, 3]
    order = rng.permutation(len(instances))
    half = len(order) // 2
    return Task(spec, tokens, values, label_tokens,
                instances[order[:half]], instances[order[half:]])


def _seed_words(spec: TaskSpec, tag: int, *rest: int) -> list[int]:
    """Seed for one of a task's random streams; tasks of different kinds never share one."""
    return [spec.seed, KINDS.index(spec.kind), tag, *rest]


def _labels(kind, tokens, values, label_tokens, a, b) -> np.ndarray:
    """LABEL tokens for operand values a, b."""
    if kind == "cmp":
        return np.where(a < b, label_tokens[0], label_tokens[1])
    token_of_value = np.empty_like(tokens)
    token_of_value[values] = tokens
    return token_of_value[(a + b) % NUM_VALUES]


def label_candidates(task: Task) -> np.ndarray:
    """Tokens LABEL can be: the 2 label tokens for T_CMP, the 100 tokens of S for T_ADD."""
    return task.label_tokens if task.spec.kind == "cmp" else task.tokens


def eval_batch(task: Task, eos_id: int, split: str = "test") -> tuple[np.ndarray, int]:
    """(TOK1 TOK2 LABEL EOS rows [B, I], one per instance of the split, and LABEL_POS); see the
    module docstring."""
    require(split in ("train", "test"), f"eval_batch: split={split!r} must be 'train' or 'test'")
    instances = task.train if split == "train" else task.test
    eos_column = np.full((len(instances), 1), eos_id, instances.dtype)
    return np.concatenate([instances, eos_column], axis=1), LABEL_POS


def _injected_before(spec: TaskSpec, step: int, tokens_per_batch: int) -> int:
    """Instances of the task injected in steps 0..step−1."""
    if spec.every_n is not None:
        return spec.every_n * (step // spec.every_n)
    return math.floor(step * _rate(spec, tokens_per_batch))


def _max_count(spec: TaskSpec, tokens_per_batch: int) -> int:
    """The largest number of instances the task injects at one step."""
    if spec.every_n is not None:
        return spec.every_n
    return math.ceil(_rate(spec, tokens_per_batch))


def _rate(spec: TaskSpec, tokens_per_batch: int) -> Fraction:
    """Exact mean instances per batch, f·B·L, with f read as the decimal it prints as."""
    return Fraction(repr(float(spec.frequency_per_token))) * tokens_per_batch


def _epoch_order(task: Task, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` injects the task's train instances (indices)."""
    return np.random.default_rng(_seed_words(task.spec, _ORDER, epoch)).permutation(
        len(task.train))


def injection_order(task: Task) -> np.ndarray:
    """Indices of the task's train instances in the order they are first injected."""
    return _epoch_order(task, 0)


def _stream(task: Task, start: int, count: int) -> np.ndarray:
    """The task's injected instances number start..start+count−1, as rows [count, 3]."""
    n = len(task.train)
    positions = np.arange(start, start + count)
    epochs = positions // n
    out = np.empty((count, 3), task.train.dtype)
    for epoch in np.unique(epochs):
        order = _epoch_order(task, int(epoch))
        here = epochs == epoch
        out[here] = task.train[order[positions[here] % n]]
    return out


def check_capacity(specs: Sequence[TaskSpec], global_batch: int, seq_len: int) -> None:
    """ConfigError unless the tasks' largest per-step counts fit the batch, one instance per
    sequence (a pure function of the specs: checked before anything is built)."""
    peaks = {}
    for spec in specs:
        peak = _max_count(spec, global_batch * seq_len)
        if spec.every_n is not None:
            value, allowed = f"every_n={spec.every_n}", f"every_n ≤ {global_batch}"
        else:
            value = f"frequency_per_token={spec.frequency_per_token}"
            allowed = f"frequency_per_token ≤ 1/seq_len = {1 / seq_len:.6g}"
        require(peak <= global_batch,
                f"TaskSpec {spec.name!r}: {value} injects up to {peak} instances per batch; "
                f"allowed at most global_batch={global_batch} (one per sequence), i.e. {allowed}")
        peaks[spec.name] = peak
    require(sum(peaks.values()) <= global_batch,
            f"Injector: tasks inject up to {sum(peaks.values())} instances per batch {peaks}; "
            f"allowed at most global_batch={global_batch}, one per sequence")


class Injector:
    """Writes the tasks' train instances into batches; the module docstring gives the rules.

    A process holding rows [p·b, (p+1)·b) of the global batch (b = B / process_count, p =
    process_index) passes those rows to `inject` and gets exactly what the single-process
    injector writes there.
    """

    def __init__(self, tasks: Sequence[Task], global_batch: int, seq_len: int, eos_id: int,
                 seed: int = 0, process_index: int = 0, process_count: int = 1):
        lows = {"global_batch": 1, "seq_len": INSTANCE_LEN, "eos_id": 0, "seed": 0}
        for name, value in zip(lows, (global_batch, seq_len, eos_id, seed)):
            require(is_int(value) and value >= lows[name],
                    f"Injector.{name}={value!r} must be an integer ≥ {lows[name]}")
        require_process_slice("Injector", global_batch, process_index, process_count)
        names = [task.spec.name for task in tasks]
        require(len(set(names)) == len(names), f"Injector: task names {names} must be unique")
        self.tasks = tuple(tasks)
        self.global_batch, self.seq_len, self.eos_id, self.seed = (
            global_batch, seq_len, eos_id, seed)
        self.tokens_per_batch = global_batch * seq_len
        self.local_batch = global_batch // process_count
        self.first_row = process_index * self.local_batch
        for task in self.tasks:
            require(eos_id not in task.tokens and eos_id not in task.label_tokens,
                    f"Injector: eos_id={eos_id} is a token of task {task.spec.name!r}; pass it "
                    f"in build_task's reserved ids")
        check_capacity([task.spec for task in self.tasks], global_batch, seq_len)

    def counts(self, step: int) -> dict[str, int]:
        """Instances of each task injected at `step` (over the global batch)."""
        require(is_int(step) and step >= 0, f"Injector: step={step!r} must be an integer ≥ 0")
        tpb = self.tokens_per_batch
        return {t.spec.name: _injected_before(t.spec, step + 1, tpb)
                - _injected_before(t.spec, step, tpb) for t in self.tasks}

    def inject(self, batch_bxL: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(a copy of the batch with this step's instances written, mask [b, L] of task tokens)."""
        expected = (self.local_batch, self.seq_len)
        require(batch_bxL.shape == expected and np.issubdtype(batch_bxL.dtype, np.integer),
                f"Injector.inject: batch of shape {batch_bxL.shape} and dtype {batch_bxL.dtype}; "
                f"expected integer tokens of shape {expected}")
        placed_rows, placed = self._placements(step)
        local = (placed_rows >= self.first_row) & (placed_rows < self.first_row + self.local_batch)
        rows = placed_rows[local] - self.first_row
        out_bxL = batch_bxL.copy()
        out_bxL[rows, :3] = placed[local]
        out_bxL[rows, 3] = self.eos_id
        mask_bxL = np.zeros(expected, dtype=bool)
        mask_bxL[rows, :INSTANCE_LEN] = True
        return out_bxL, mask_bxL

    def row_tasks(self, step: int) -> np.ndarray:
        """[b] int32: the index (in `tasks`) of the task whose instance `inject` writes into each
        of this process's rows at `step`, −1 for rows left as text."""
        placed_rows, _ = self._placements(step)
        counts = self.counts(step)
        task_of_placed = np.repeat(np.arange(len(self.tasks)),
                                   [counts[t.spec.name] for t in self.tasks])
        out = np.full(self.local_batch, -1, np.int32)
        local = (placed_rows >= self.first_row) & (placed_rows < self.first_row + self.local_batch)
        out[placed_rows[local] - self.first_row] = task_of_placed[local]
        return out

    def distinct_injected(self, step: int) -> list[int]:
        """Per task, how many distinct train instances steps 0 … step − 1 injected: the first
        that many of `injection_order`."""
        return [min(_injected_before(t.spec, step, self.tokens_per_batch), len(t.train))
                for t in self.tasks]

    def _placements(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(global rows [count], instances [count, 3]) placed at `step`, tasks in order."""
        counts = self.counts(step)
        placed = np.concatenate(
            [np.zeros((0, 3), np.int64)]  # No task: nothing placed.
            + [_stream(t, _injected_before(t.spec, step, self.tokens_per_batch),
                       counts[t.spec.name]) for t in self.tasks])
        rng = np.random.default_rng([self.seed, _ROWS, step])
        return rng.permutation(self.global_batch)[:len(placed)], placed

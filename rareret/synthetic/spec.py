"""The synthetic experiment's specs: task mixture, sweep, injection schedule (no JAX).

`TaskMixture` fixes the data (docs/method.md §1): K tasks each own an orthogonal block of d_T
input coordinates; task k (0-based here, k+1 in the paper) reads x[k·d_T:(k+1)·d_T] and its target
is that block scaled by sqrt(λ_{k,j}). `Sweep` fixes the models and the training run;
`Injection` the matched-frequency schedule of one rare task. All are validated on construction,
so a bad value fails with one line before any work starts; analysis code reads a run's
`spec.json` back into them without importing JAX.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from rareret.errors import is_int, is_number, require, require_int_fields

ENERGY_FRACTION = 0.9  # "number of directions holding 90% of the energy" (docs/method.md §1.3).
SPECTRUM_NORMS = ("first", "trace")  # TaskMixture.spectrum_norm: λ_{k,1} = 1 or Tr C_k = 1.


def directions_for_energy(spectrum: np.ndarray, fraction: float = ENERGY_FRACTION) -> int:
    """Smallest n such that the n largest entries of `spectrum` hold `fraction` of its sum."""
    cum = np.cumsum(np.sort(spectrum)[::-1]) / np.sum(spectrum)
    return int(np.searchsorted(cum, fraction - 1e-12) + 1)


def power_spectrum(alpha: float, task_dim: int) -> np.ndarray:
    """λ_j ∝ j^(−α), j = 1..task_dim, normalised to sum 1."""
    lam = np.arange(1, task_dim + 1, dtype=np.float64) ** (-float(alpha))
    return lam / lam.sum()


def alpha_for_directions(n: int, task_dim: int) -> float:
    """An α whose power spectrum needs exactly `n` directions for 90% of its energy.

    The set of such α is an interval [a_n, a_{n-1}); this returns its midpoint (or a_n + 1 when
    n = 1, whose interval is unbounded), found by bisection on the monotone energy curve.
    """
    max_n = directions_for_energy(power_spectrum(0.0, task_dim))
    require(1 <= n <= max_n,
            f"TaskMixture.complexity_range: {n} directions for 90% energy is impossible with "
            f"task_dim={task_dim}; allowed 1..{max_n}")

    def threshold(m: int) -> float:  # smallest α at which the top m directions hold 90%.
        if m >= max_n:
            return 0.0
        lo, hi = 0.0, 64.0
        for _ in range(100):
            mid = (lo + hi) / 2
            if power_spectrum(mid, task_dim)[:m].sum() >= ENERGY_FRACTION:
                hi = mid
            else:
                lo = mid
        return hi

    low = threshold(n)
    return low + 1.0 if n == 1 else (low + threshold(n - 1)) / 2


@dataclasses.dataclass(frozen=True)
class TaskMixture:
    """Every knob of the synthetic task mixture (docs/method.md §1.3). Validated on construction.

    Attributes:
      num_tasks: K.
      task_dim: d_T, coordinates per task block (1 = the rank-1 variant).
      input_dim: D; must be ≥ K·d_T.
      beta: prior exponent, π_k ∝ k^(−β); ignored when `priors` is given.
      priors: explicit task priors (K non-negative numbers, normalised here).
      alpha: within-task spectrum exponent, λ_{k,j} ∝ j^(−α); ignored with `complexity_range`.
      complexity_range: (lo, hi): choose α_k per task so the number of directions holding 90% of
        the energy runs linearly from lo (most frequent task) to hi (rarest task).
      spectrum_norm: the scale of each task's spectrum. 'first' (default): λ_{k,1} = 1, so
        λ_{k,j} = j^(−α_k) as the paper writes it; this reproduces the paper's δ_F threshold
        (≈ 1e-2 at its configuration). 'trace': Tr C_k = Σ_j λ_{k,j} = 1 (6.4e-3 there).
        Normalised losses ℓ_k/Tr C_k, alignments and, at one α for all tasks, the utility order
        do not depend on it; δ_F, utilities and raw losses scale with it, and with per-task α_k
        (`complexity_range`) so does the utility order across tasks.
    """

    num_tasks: int = 32
    task_dim: int = 32
    input_dim: int = 1024
    beta: float = 2.0
    priors: Sequence[float] | None = None
    alpha: float = 2.0
    complexity_range: Sequence[int] | None = None
    spectrum_norm: str = "first"

    def __post_init__(self):
        require_int_fields(self, 1, "num_tasks", "task_dim", "input_dim")
        used = self.num_tasks * self.task_dim
        require(used <= self.input_dim,
                f"TaskMixture: num_tasks × task_dim = {self.num_tasks}×{self.task_dim} = {used} "
                f"exceeds input_dim={self.input_dim}; task blocks are disjoint, so K·d_T ≤ D")
        for name in ("beta", "alpha"):
            value = getattr(self, name)
            require(is_number(value) and math.isfinite(value) and value >= 0,
                    f"TaskMixture.{name}={value!r} must be a finite number ≥ 0")
        require(isinstance(self.spectrum_norm, str) and self.spectrum_norm in SPECTRUM_NORMS,
                f"TaskMixture.spectrum_norm={self.spectrum_norm!r} is not one of "
                f"{list(SPECTRUM_NORMS)}")
        if self.priors is not None:
            p = self.priors
            require(isinstance(p, (list, tuple)) and all(is_number(v) for v in p),
                    f"TaskMixture.priors={p!r} must be a list of numbers")
            require(len(p) == self.num_tasks,
                    f"TaskMixture.priors has {len(p)} entries; need num_tasks={self.num_tasks}")
            require(all(math.isfinite(v) and v >= 0 for v in p) and sum(p) > 0,
                    f"TaskMixture.priors={list(p)} must be finite, ≥ 0, with a positive sum")
        if self.complexity_range is not None:
            r = self.complexity_range
            max_n = directions_for_energy(power_spectrum(0.0, self.task_dim))
            require(isinstance(r, (list, tuple)) and len(r) == 2 and all(is_int(n) for n in r)
                    and 1 <= r[0] <= r[1] <= max_n,
                    f"TaskMixture.complexity_range={r!r} must be two integers 1 ≤ lo ≤ hi ≤ "
                    f"{max_n} (the most 90%-energy directions task_dim={self.task_dim} allows)")

    def prior_array(self) -> np.ndarray:
        """π [K], summing to 1."""
        if self.priors is not None:
            p = np.asarray(self.priors, dtype=np.float64)
        else:
            p = np.arange(1, self.num_tasks + 1, dtype=np.float64) ** (-float(self.beta))
        return p / p.sum()

    def alphas(self) -> np.ndarray:
        """α_k [K]: one value, or spread by prior rank so the rarest task is most complex."""
        if self.complexity_range is None:
            return np.full(self.num_tasks, float(self.alpha))
        lo, hi = self.complexity_range
        rank = np.empty(self.num_tasks, dtype=np.int64)  # 0 = most frequent.
        rank[np.argsort(-self.prior_array(), kind="stable")] = np.arange(self.num_tasks)
        frac = rank / max(self.num_tasks - 1, 1)
        counts = np.rint(lo + (hi - lo) * frac).astype(int)
        return np.array([alpha_for_directions(int(n), self.task_dim) for n in counts])

    def spectra(self) -> np.ndarray:
        """λ [K, T], each row sorted descending; λ_{k,1} = 1 or Tr C_k = 1 (`spectrum_norm`)."""
        spectra_KxT = np.stack([power_spectrum(a, self.task_dim) for a in self.alphas()])
        if self.spectrum_norm == "first":
            spectra_KxT = spectra_KxT / spectra_KxT[:, :1]
        return spectra_KxT

    def traces(self) -> np.ndarray:
        """Tr C_k = Σ_j λ_{k,j} [K]: the mean predictor's loss, the unit of normalised losses."""
        return self.spectra().sum(axis=1)

    def block(self, task: int) -> slice:
        """The input coordinates task `task` (0-based) reads."""
        return slice(task * self.task_dim, (task + 1) * self.task_dim)


def rarest_task(priors_K: np.ndarray) -> int:
    """Index of the lowest-prior task (the last one among equals)."""
    return int(np.flatnonzero(priors_K == priors_K.min())[-1])


def multiplied_priors(priors_K: np.ndarray, rare_task: int, multiplier: float) -> np.ndarray:
    """π with the rare task's prior × `multiplier` and the others scaled to keep the sum 1
    (`priors_K` itself at multiplier 1)."""
    if multiplier == 1:
        return priors_K
    rare = priors_K[rare_task]
    out_K = priors_K * ((1 - rare * multiplier) / (1 - rare))
    out_K[rare_task] = rare * multiplier
    return out_K


@dataclasses.dataclass(frozen=True)
class Injection:
    """Matched-frequency injection of one rare task (docs/method.md §5).

    Time is cut into cycles of `gap` steps. The first gap − 1 steps of a cycle hold no rare
    example; its last step holds the cycle's m_c rare examples, with m_c chosen so that after c
    cycles exactly floor(c · gap · B · rate) have been injected: the long-run frequency is `rate`
    (to within one example, whatever the rounding of gap · B · rate). Every other example, at
    every step, is drawn from the prior renormalised over the other tasks.

    Attributes:
      gap: G, steps per cycle; several gaps make gap a per-model axis (one data stream each).
      rare_task: the withheld task, 0-based; default the rarest task.
      rate: long-run frequency ρ_r of the rare task; default its prior π_r.
      replay_after: 0 (default: no replay), or k: each injection's rare rows (inputs and
        task) are shown again, exactly, k steps later, and cycles inject fresh rows at half the
        rate, so the rare rows shown stay within one of the plain schedule's (docs/method.md
        §5.3). Needs one gap (and one `Sweep.rare_multiplier`), k not a multiple of it.
    """

    gap: int | Sequence[int] = 256
    rare_task: int | None = None
    rate: float | None = None
    replay_after: int = 0

    def __post_init__(self):
        require(len(self.gaps) > 0, "Injection.gap=[] must name at least one gap")
        for gap in self.gaps:
            require(is_int(gap) and gap >= 1, f"Injection.gap: {gap!r} must be an integer ≥ 1")
        require(len(set(self.gaps)) == len(self.gaps),
                f"Injection.gap={list(self.gaps)} has duplicates")
        require(self.rare_task is None or (is_int(self.rare_task) and self.rare_task >= 0),
                f"Injection.rare_task={self.rare_task!r} must be a task index ≥ 0")
        require(self.rate is None or (is_number(self.rate) and 0 < self.rate <= 1),
                f"Injection.rate={self.rate!r} must be a number in (0, 1]")
        require(is_int(self.replay_after) and self.replay_after >= 0,
                f"Injection.replay_after={self.replay_after!r} must be an integer ≥ 0")
        if self.replay_after:
            require(len(self.gaps) == 1,
                    f"Injection.replay_after={self.replay_after} needs one gap, not "
                    f"{list(self.gaps)}: every stream must replay the same rows")
            require(self.replay_after % self.gaps[0] != 0,
                    f"Injection.replay_after={self.replay_after} is a multiple of "
                    f"Injection.gap={self.gaps[0]}: replays would land on injections")

    @property
    def gaps(self) -> tuple[int, ...]:
        gap = self.gap
        return tuple(gap) if isinstance(gap, (list, tuple)) else (gap,)

    def rare(self, mixture: TaskMixture) -> int:
        """The rare task's index; by default the rarest."""
        return rarest_task(mixture.prior_array()) if self.rare_task is None else self.rare_task

    def resolved_rate(self, mixture: TaskMixture) -> float:
        return float(mixture.prior_array()[self.rare(mixture)] if self.rate is None else self.rate)

    def check_against(self, mixture: TaskMixture, batch_size: int) -> None:
        """Raises ConfigError unless the schedule fits the mixture and batch size."""
        require(self.rare(mixture) < mixture.num_tasks,
                f"Injection.rare_task={self.rare_task} is not a task of "
                f"TaskMixture.num_tasks={mixture.num_tasks} (0-based)")
        require(mixture.num_tasks >= 2, "Injection needs TaskMixture.num_tasks ≥ 2")
        rate = self.resolved_rate(mixture)
        for gap in self.gaps:
            require(gap * rate <= 1,
                    f"Injection.gap={gap} with rate {rate:.4g} injects {gap * batch_size * rate:.0f}"
                    f" rare examples into a batch of {batch_size}; need gap × rate ≤ 1")

    def counts(self, gap: int, batch_size: int, rate: float | Fraction,
               num_cycles: int) -> np.ndarray:
        """m_c, fresh rare examples injected at the end of cycle c, [num_cycles] int (at half
        `rate` under replay, each shown twice)."""
        # The rate as the decimal it prints as (a Fraction prints as itself, 'p/q').
        per_cycle = gap * batch_size * Fraction(str(rate)) / (2 if self.replay_after else 1)
        cumulative = [c * per_cycle.numerator // per_cycle.denominator
                      for c in range(num_cycles + 1)]
        return np.diff(np.asarray(cumulative, np.int64)).astype(np.int32)


INTERFERENCE_MODES = ("population", "sampled")
UPDATE_RULES = ("adamw", "pcgrad", "cagrad")  # Sweep.update_rule; see synthetic/aggregators.py.


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What to train: the models (widths × seeds × learning rates) and for how long.

    Attributes:
      widths: encoder widths N, each ≤ TaskMixture.input_dim.
      seeds: model seeds; a model's init depends only on (seed, width).
      learning_rate: peak AdamW rate, one value or several (a per-model axis; no recompiling).
      warmup_steps: linear warm-up before the 1/sqrt(step) decay.
      batch_size: examples per step, shared by all models.
      num_steps: training steps.
      record_every: steps between metric records (records also at step 0 and at the end).
      data_seed: seed of the data stream; batch t is a pure function of (data_seed, t).
      weight_decay: AdamW decoupled weight decay (PyTorch default 0.01).
      tile_size: rows per task tile in the decoder pass (speed only; results do not change).
      interference_every: steps between task × task gradient-interference records (0 = never).
      interference_mode: "population" (exact gradients under x ~ N(0, I)) or "sampled" (the
        gradients of that step's batch).
      checkpoint_every: steps between checkpoints (taken at the first record at or after each
        multiple, and at the end); a re-run resumes from the latest.
      rare_multiplier: None (default), or one number or several (a per-model axis): the rare
        task (`Injection.rare_task`, else the rarest) is drawn at multiplier × its rate, its
        prior π_r (the other tasks' priors scaled by (1 − m·π_r)/(1 − π_r)) or, under an
        injection schedule, m × `Injection.rate` per cycle. Each value gets its own stream of
        task ids over the shared inputs; the realised rate is recorded (`rare_rate`).
      update_rule: 'adamw' (default: the paper's optimiser on the batch gradient), or 'pcgrad'
        / 'cagrad': the batch's per-task encoder gradients are combined by that rule
        (`rareret.synthetic.aggregators`) before the same clipping and AdamW; a list makes it a
        per-model axis (docs/method.md §5.2).
    """

    widths: Sequence[int] = (2, 4, 8, 16, 32, 64, 128, 256)
    seeds: Sequence[int] = (0,)
    learning_rate: float | Sequence[float] = 1e-3
    warmup_steps: int = 1000
    batch_size: int = 1024
    num_steps: int = 100_000
    record_every: int = 1000
    data_seed: int = 0
    weight_decay: float = 0.01
    tile_size: int = 32
    interference_every: int = 0
    interference_mode: str = "population"
    checkpoint_every: int = 5000
    rare_multiplier: float | Sequence[float] | None = None
    update_rule: str | Sequence[str] = "adamw"

    def __post_init__(self):
        _require_int_list("Sweep.widths", self.widths, minimum=1)
        _require_int_list("Sweep.seeds", self.seeds, minimum=0)
        require(len(self.learning_rates) > 0, "Sweep.learning_rate=[] must name at least one rate")
        for rate in self.learning_rates:
            require(is_number(rate) and 0 < rate < math.inf,
                    f"Sweep.learning_rate={rate!r} must be a finite number > 0")
        require_int_fields(self, 1, "batch_size", "num_steps", "record_every", "tile_size",
                           "checkpoint_every")
        require(self.interference_mode in INTERFERENCE_MODES,
                f"Sweep.interference_mode={self.interference_mode!r} is not one of "
                f"{list(INTERFERENCE_MODES)}")
        require_int_fields(self, 0, "warmup_steps", "data_seed", "interference_every")
        require(is_number(self.weight_decay) and 0 <= self.weight_decay < math.inf,
                f"Sweep.weight_decay={self.weight_decay!r} must be a finite number ≥ 0")
        multipliers = self.rare_multipliers
        require(len(multipliers) > 0, "Sweep.rare_multiplier=[] must name at least one value")
        for value in multipliers:
            require(is_number(value) and 0 < value < math.inf,
                    f"Sweep.rare_multiplier: {value!r} must be a finite number > 0")
        require(len(set(multipliers)) == len(multipliers),
                f"Sweep.rare_multiplier={list(multipliers)} has duplicates")
        rules = self.update_rules
        require(len(rules) > 0 and len(set(rules)) == len(rules)
                and all(isinstance(r, str) and r in UPDATE_RULES for r in rules),
                f"Sweep.update_rule={self.update_rule!r} must be one or more distinct values "
                f"of {list(UPDATE_RULES)}")

    @property
    def learning_rates(self) -> tuple[float, ...]:
        rates = self.learning_rate
        return tuple(rates) if isinstance(rates, (list, tuple)) else (rates,)

    @property
    def rare_multipliers(self) -> tuple[float, ...]:
        """The rare-task multipliers; (1,) when `rare_multiplier` is unset."""
        value = 1 if self.rare_multiplier is None else self.rare_multiplier
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)

    @property
    def update_rules(self) -> tuple[str, ...]:
        rules = self.update_rule
        return tuple(rules) if isinstance(rules, (list, tuple)) else (rules,)

    def check_against(self, mixture: TaskMixture, injection: Injection | None = None) -> None:
        """Raises ConfigError if the sweep does not fit the mixture (and injection schedule)."""
        for width in self.widths:
            require(width <= mixture.input_dim,
                    f"Sweep.widths: width {width} exceeds TaskMixture.input_dim="
                    f"{mixture.input_dim}")
        if self.rare_multiplier is None:
            return
        require(not (injection and injection.replay_after and len(self.rare_multipliers) > 1),
                f"Injection.replay_after needs one Sweep.rare_multiplier, not "
                f"{list(self.rare_multipliers)}: every stream must replay the same rows")
        priors_K = mixture.prior_array()
        for value in self.rare_multipliers:
            if injection:
                rate = injection.resolved_rate(mixture) * value
                for gap in injection.gaps:
                    require(gap * rate <= 1,
                            f"Sweep.rare_multiplier={value} with Injection.gap={gap} injects "
                            f"{gap * self.batch_size * rate:.0f} rare examples into a batch of "
                            f"{self.batch_size}; need gap × rate × multiplier ≤ 1")
            else:
                prior = priors_K[rarest_task(priors_K)]
                require(prior * value < 1,
                        f"Sweep.rare_multiplier={value} makes the rare task's prior "
                        f"{prior:.4g} × {value} = {prior * value:.4g}; need < 1")

    def record_steps(self, injection: Injection | None = None) -> list[int]:
        """Steps (models' states after that many steps) at which metrics are recorded.

        Step 0, every `record_every` and `interference_every` step, the last step, and for every
        injection the states just before and just after it.
        """
        steps = {0, self.num_steps}
        steps.update(range(0, self.num_steps, self.record_every))
        if self.interference_every:
            steps.update(range(0, self.num_steps, self.interference_every))
        for gap in injection.gaps if injection else ():
            for end in range(gap, self.num_steps + 1, gap):  # Injection at step end − 1.
                steps.update((end - 1, end))
        return sorted(steps)


def _require_int_list(name: str, values, minimum: int) -> None:
    require(isinstance(values, (list, tuple)) and len(values) > 0,
            f"{name}={values!r} must be a non-empty list of integers")
    for value in values:
        require(is_int(value) and value >= minimum,
                f"{name}: {value!r} must be an integer ≥ {minimum}")
    duplicates = sorted({v for v in values if list(values).count(v) > 1})
    require(not duplicates, f"{name}: duplicate value(s) {duplicates}")

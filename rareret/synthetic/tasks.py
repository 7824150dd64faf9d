"""The synthetic multi-task mixture of PAPER.md §1 and its on-device data stream.

K tasks each own an orthogonal block of d_T input coordinates: task k (0-based here, k+1 in the
paper) reads x[k·d_T:(k+1)·d_T] and its target is y = Λ_k^{1/2} B_kᵀ x, i.e. that block scaled
by sqrt(λ_{k,j}). Coordinates past K·d_T are distractors no task reads. Task priors are
π_k ∝ k^(−β) (or explicit), spectra λ_{k,j} ∝ j^(−α_k), each task normalised to Tr(C_k) = 1 so that
tasks differ in frequency and shape but not in total signal. The rank-1 variant is task_dim=1.

Shapes: B batch, D input dim, K tasks, T task dim (d_T).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rareret.errors import is_int, is_number, require, require_int_fields

ENERGY_FRACTION = 0.9  # "number of directions holding 90% of the energy" (PAPER.md §1).


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
    """Every knob of the synthetic task mixture (PAPER.md §1). Validated on construction.

    Attributes:
      num_tasks: K.
      task_dim: d_T, coordinates per task block (1 = the rank-1 variant).
      input_dim: D; must be ≥ K·d_T.
      beta: prior exponent, π_k ∝ k^(−β); ignored when `priors` is given.
      priors: explicit task priors (K non-negative numbers, normalised here).
      alpha: within-task spectrum exponent, λ_{k,j} ∝ j^(−α); ignored with `complexity_range`.
      complexity_range: (lo, hi): choose α_k per task so the number of directions holding 90% of
        the energy runs linearly from lo (most frequent task) to hi (rarest task).
    """

    num_tasks: int = 32
    task_dim: int = 32
    input_dim: int = 1024
    beta: float = 2.0
    priors: Sequence[float] | None = None
    alpha: float = 2.0
    complexity_range: Sequence[int] | None = None

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
        """λ [K, T], each row sorted descending and summing to 1 (Tr C_k = 1)."""
        return np.stack([power_spectrum(a, self.task_dim) for a in self.alphas()])

    def block(self, task: int) -> slice:
        """The input coordinates task `task` (0-based) reads."""
        return slice(task * self.task_dim, (task + 1) * self.task_dim)


def batch_key(data_seed: int, step) -> jax.Array:
    """The key of step `step`'s batch: the data stream is a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.key(data_seed), step)


def sample_inputs(key: jax.Array, batch_size: int, input_dim: int) -> jax.Array:
    """x_BxD ~ N(0, I), float32."""
    return jax.random.normal(jax.random.fold_in(key, 0), (batch_size, input_dim), jnp.float32)


def sample_tasks(key: jax.Array, batch_size: int, priors_K: jax.Array) -> jax.Array:
    """task_B: i.i.d. draws from the prior, returned sorted.

    Examples are exchangeable and x is independent of the task, so sorting the ids leaves the
    batch's distribution unchanged; it lets the model process each task's rows as one block.
    """
    return stream_tasks(key, batch_size, priors_K, 0, 0)


def targets(x_BxD: jax.Array, task_B: jax.Array, sqrt_spectra_KxT: jax.Array) -> jax.Array:
    """y_BxT = Λ_k^{1/2} B_kᵀ x for each example's task k."""
    num_tasks, task_dim = sqrt_spectra_KxT.shape
    blocks_BxKxT = x_BxD[:, : num_tasks * task_dim].reshape(x_BxD.shape[0], num_tasks, task_dim)
    own_BxT = jnp.take_along_axis(blocks_BxKxT, task_B[:, None, None], axis=1)[:, 0]
    return own_BxT * sqrt_spectra_KxT[task_B]



def rarest_task(priors_K: np.ndarray) -> int:
    """Index of the lowest-prior task (the last one among equals)."""
    return int(np.flatnonzero(priors_K == priors_K.min())[-1])


@dataclasses.dataclass(frozen=True)
class Injection:
    """Matched-frequency injection of one rare task (PAPER.md §1, "retention").

    Time is cut into cycles of `gap` steps. The first gap − 1 steps of a cycle hold no rare
    example; its last step holds the cycle's m_c rare examples, with m_c chosen so that after c
    cycles exactly floor(c · gap · B · rate) have been injected: the long-run frequency is `rate`
    (to within one example, whatever the rounding of gap · B · rate). Every other example, at
    every step, is drawn from the prior renormalised over the other tasks.

    Attributes:
      gap: G, steps per cycle; several gaps make gap a per-model axis (one data stream each).
      rare_task: the withheld task, 0-based; default the rarest task.
      rate: long-run frequency ρ_r of the rare task; default its prior π_r.
    """

    gap: int | Sequence[int] = 256
    rare_task: int | None = None
    rate: float | None = None

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

    def counts(self, gap: int, batch_size: int, rate: float, num_cycles: int) -> np.ndarray:
        """m_c, rare examples injected at the end of cycle c, [num_cycles] int."""
        per_cycle = gap * batch_size * Fraction(str(rate))  # The rate as the decimal it prints.
        cumulative = [c * per_cycle.numerator // per_cycle.denominator
                      for c in range(num_cycles + 1)]
        return np.diff(np.asarray(cumulative, np.int64)).astype(np.int32)


def stream_tasks(key: jax.Array, batch_size: int, priors_K: jax.Array, rare_task,
                 rare_count) -> jax.Array:
    """task_B of one data stream: `rare_count` examples of `rare_task`, the rest from the prior
    (pass priors with 0 at the rare task for the renormalised prior). Sorted.

    Draws by inverse CDF (one uniform per example), not Gumbel-max (one per example and task).
    """
    draws = jax.random.choice(jax.random.fold_in(key, 1), priors_K.shape[0], (batch_size,),
                              p=priors_K)
    draws = jnp.where(jnp.arange(batch_size) < rare_count, rare_task, draws)
    return jnp.sort(draws).astype(jnp.int32)

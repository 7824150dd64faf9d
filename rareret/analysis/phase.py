"""Phase-diagram analysis of a synthetic run: which width learns which task, observed vs theory.

A task counts as *learned* by a model when its normalised loss is at most halfway down the drop
its first feature gives: ℓ_k ≤ 1 − λ_{k,1} / (2 Tr C_k). For the rank-1 variant that is ℓ_k ≤ 0.5,
the paper's "learned ⇔ s_k > 0.5". The observed critical width of a task is the smallest grid
width from which every wider model has learned it; the predicted one is the smallest grid width
at or above the Theorem-3 staircase N*_k(1) (docs/method.md §3.1, §4.4).

Shapes: see docs/method.md "Shape letters": M models, K tasks, W grid widths.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from rareret import store
from rareret.errors import ConfigError, require
from rareret.synthetic import theory
from rareret.synthetic.spec import UPDATE_RULES, Injection, Sweep, TaskMixture


@dataclasses.dataclass
class SyntheticRun:
    """A synthetic run's specs and committed metrics, loaded with plain numpy."""

    mixture: TaskMixture
    sweep: Sweep
    injection: Injection | None
    metrics: store.MetricReader

    @classmethod
    def load(cls, workdir: str) -> SyntheticRun:
        """The run in `workdir`; ConfigError if it holds none, or one of another experiment."""
        spec = read_spec(workdir)
        require(spec.get("experiment") == "synthetic",
                f"{workdir} holds a run of experiment {spec.get('experiment')!r}; this reads "
                f"synthetic runs only")
        injection = spec.get("injection")
        # Runs written before `spectrum_norm` existed used Tr C_k = 1.
        mixture = TaskMixture(**{"spectrum_norm": "trace", **spec["mixture"]})
        return cls(mixture, Sweep(**spec["sweep"]),
                   Injection(**injection) if injection else None,
                   store.open_metrics(os.path.join(workdir, "metrics")))

    def final(self, name: str) -> np.ndarray:
        """The last committed record of a record array."""
        return self.metrics.read(name)[-1]


def read_spec(workdir: str) -> dict:
    """A run's `spec.json`; ConfigError naming `workdir` if it holds no readable one."""
    path = os.path.join(workdir, "spec.json")
    require(os.path.isfile(path), f"{workdir} holds no rareret run (no spec.json)")
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable: {e}") from e
    require(isinstance(spec, dict), f"{path} is not a rareret spec (not a JSON object)")
    return spec


def learned_threshold(mixture: TaskMixture) -> np.ndarray:
    """Per-task normalised loss at or below which the task counts as learned, [K]."""
    spectra_KxT = mixture.spectra()
    return 1.0 - spectra_KxT[:, 0] / (2.0 * spectra_KxT.sum(axis=1))


def mean_over_seeds(values_MxK: np.ndarray, widths_M: np.ndarray, widths: list[int]) -> np.ndarray:
    """Averages per-model rows over the models of each width, [W, K]."""
    return np.stack([values_MxK[widths_M == w].mean(axis=0) for w in widths])


def critical_widths(learned_WxK: np.ndarray, widths: list[int]) -> np.ndarray:
    """Smallest grid width from which all wider models learned each task; 0 if none, [K]."""
    out = np.zeros(learned_WxK.shape[1], dtype=np.int64)
    for k in range(learned_WxK.shape[1]):
        for i in range(len(widths) - 1, -1, -1):
            if not learned_WxK[i, k]:
                break
            out[k] = widths[i]
    return out


def predicted_grid_widths(mixture: TaskMixture, widths: list[int]) -> np.ndarray:
    """Smallest grid width ≥ the staircase N*_k(1); 0 if the grid never reaches it, [K]."""
    stairs_K = theory.staircase(mixture, 1)
    grid = np.asarray(sorted(widths))
    return np.array([grid[grid >= n][0] if np.any(grid >= n) else 0 for n in stairs_K])


@dataclasses.dataclass
class PhaseComparison:
    widths: list[int]
    observed_WxK: np.ndarray
    predicted_WxK: np.ndarray
    observed_critical_K: np.ndarray
    predicted_critical_K: np.ndarray
    staircase_K: np.ndarray

    @property
    def mean_abs_error(self) -> float:
        return float(np.mean(np.abs(self.observed_WxK - self.predicted_WxK)))

    def grid_steps_off(self) -> np.ndarray:
        """|observed − predicted| critical width in grid steps per task (0 = none ↦ past the end)."""
        index = {w: i for i, w in enumerate(self.widths)}
        past_end = len(self.widths)
        obs = np.array([index.get(w, past_end) for w in self.observed_critical_K])
        pred = np.array([index.get(w, past_end) for w in self.predicted_critical_K])
        return np.abs(obs - pred)


def base_lever(run: SyntheticRun) -> tuple[np.ndarray, str]:
    """The models [M] on the base lever, and what it is: rare multiplier 1 (else the first
    listed) and the first update rule (docs/method.md §5.1, §5.2). Levers are not seeds, so
    analyses that average over models keep to these."""
    chosen_M = np.ones(len(run.metrics.read("width")), bool)
    words = []
    multipliers = run.sweep.rare_multipliers
    if run.sweep.rare_multiplier is not None:
        base = 1 if 1 in multipliers else multipliers[0]
        chosen_M &= np.isclose(run.metrics.read("rare_multiplier"), base)
        words.append(f"rare multiplier {base:g}")
    rules = run.sweep.update_rules
    if rules != ("adamw",):
        chosen_M &= run.metrics.read("update_rule") == UPDATE_RULES.index(rules[0])
        words.append(f"update rule {rules[0]}")
    return chosen_M, ", ".join(words)


def compare_with_theory(run: SyntheticRun, task_loss_MxK: np.ndarray | None = None,
                        learning_rate: float | None = None) -> PhaseComparison:
    """Final normalised losses (seed-averaged) against Theorem 3, for one learning rate.

    Under an injection schedule only the models of the smallest gap are compared, and of
    several levers only the base one (`base_lever`).
    """
    widths = sorted(run.sweep.widths)
    coords_lr, gaps_M = run.metrics.read("learning_rate"), run.metrics.read("gap")
    rate = coords_lr[0] if learning_rate is None else learning_rate
    chosen_M = np.isclose(coords_lr, rate) & (gaps_M == gaps_M.min()) & base_lever(run)[0]
    loss_MxK = run.final("task_loss") if task_loss_MxK is None else task_loss_MxK
    observed = mean_over_seeds(loss_MxK[chosen_M], run.metrics.read("width")[chosen_M], widths)
    learned = observed <= learned_threshold(run.mixture)
    return PhaseComparison(
        widths=widths, observed_WxK=observed,
        predicted_WxK=theory.predicted_loss(run.mixture, widths),
        observed_critical_K=critical_widths(learned, widths),
        predicted_critical_K=predicted_grid_widths(run.mixture, widths),
        staircase_K=theory.staircase(run.mixture, 1))

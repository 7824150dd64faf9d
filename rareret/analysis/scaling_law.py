"""The scaling-law argument of the paper's Fig. 1, computed (numpy only).

With L(N, D) = L0 + A/N^α + B/D^β (N parameters, D tokens, compute C = 6·N·D), the
compute-optimal model at compute C minimises L over N with D = C/(6N); the infinite-data loss is
L(N, ∞) = L0 + A/N^α. `exponents` fits the log-log slopes of the reducible losses (L − L0) along
both curves numerically, over N from 1e7 to 1e11, rather than from the closed forms (so the fit
checks them: along the compute-optimal frontier αA/N^α = βB/D^β, hence
L − L0 = (1 + α/β)·A/N^α ∝ N^−α ∝ C^−αβ/(α+β)).

The paper gives α ≈ 0.46 and β ≈ 0.51 but not L0, A, B; the defaults take Hoffmann et al.'s
(2022) L0 = 1.69, A = 406.4, B = 410.7 as the scales (the exponents do not depend on them).
"""

from __future__ import annotations

import dataclasses

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rareret.analysis import figures  # noqa: E402

PAPER_COMPUTE_OPTIMAL_EXPONENT = 0.34  # The paper: compute-optimal loss ∝ N^−0.34.


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    l0: float = 1.69
    a: float = 406.4
    b: float = 410.7
    alpha: float = 0.46
    beta: float = 0.51

    def loss(self, n, d):
        return self.l0 + self.a / np.power(n, self.alpha) + self.b / np.power(d, self.beta)

    def compute_optimal(self, compute: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N*, L*) per compute budget, by minimising over a fine log grid of N."""
        n_grid = np.logspace(5, 14, 4001)
        loss_CxN = self.loss(n_grid[None, :], compute[:, None] / (6 * n_grid[None, :]))
        best = np.argmin(loss_CxN, axis=1)
        return n_grid[best], loss_CxN[np.arange(len(compute)), best]


@dataclasses.dataclass(frozen=True)
class Exponents:
    compute_optimal: float  # −d log(L* − L0) / d log N* along the frontier.
    compute_optimal_c: float  # −d log(L* − L0) / d log C.
    infinite_data: float  # −d log(L(N, ∞) − L0) / d log N.
    gap_fraction: float  # Share of the compute-optimal reducible loss that is the data term.


def _slope(x, y) -> float:
    return float(-np.polyfit(np.log(x), np.log(y), 1)[0])


def exponents(law: ScalingLaw) -> Exponents:
    compute = np.logspace(18, 26, 41)
    n_star, loss_star = law.compute_optimal(compute)
    inside = (n_star > 1e7) & (n_star < 1e11)
    n_star, loss_star, compute = n_star[inside], loss_star[inside], compute[inside]
    reducible = loss_star - law.l0
    infinite = law.a / np.power(n_star, law.alpha)
    return Exponents(_slope(n_star, reducible), _slope(compute, reducible),
                     _slope(n_star, infinite), float(np.median(1 - infinite / reducible)))


def plot(law: ScalingLaw, path: str) -> str:
    compute = np.logspace(18, 26, 41)
    n_star, loss_star = law.compute_optimal(compute)
    n = np.logspace(7, 11, 50)
    fit = exponents(law)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(n_star, loss_star - law.l0, "o-", ms=3,
              label=f"compute-optimal: ∝ N^−{fit.compute_optimal:.2f}")
    ax.loglog(n, law.a / np.power(n, law.alpha), "k--",
              label=f"infinite data: ∝ N^−{fit.infinite_data:.2f}")
    ax.set_xlim(1e7, 1e11)
    ax.set_xlabel("parameters N")
    ax.set_ylabel("reducible loss L − L0")
    ax.set_title(f"L = L0 + A/N^{law.alpha} + B/D^{law.beta}")
    ax.legend()
    return figures.save(fig, path)

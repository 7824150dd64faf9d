"""Closed-form predictions for the linear-bottleneck toy (docs/method.md §4).

M = Σ_k π_k C_k has eigenvalues u_{k,j} = π_k λ_{k,j}, the feature utilities. A width-N minimiser
spans the top-N eigenspace of M (Theorem 3), so features are learned in descending utility order.

Conventions:
  - Tasks and features are 0-based here (the paper's task k is index k−1); widths N are counts.
  - Utility ties are broken by task index ascending, then feature index ascending, so ranks are
    deterministic. Utilities within a relative `TIE` of each other count as tied: with β = α they
    tie exactly in the reals ((k j)^(−β) up to scale), and round-off must not pick the order.
  - Utilities and δ_F carry the spectrum's scale (`TaskMixture.spectrum_norm`); normalised losses
    ℓ_k/Tr C_k, alignments and (at one α for all tasks) the utility order do not.
  - The frequent set F is the smallest set of top-prior tasks whose cumulative prior mass is
    ≥ `mass` (0.8 by default; prior ties go to the lower task index). The paper's own |F| values
    are inconsistent with any single rule, so this is rareret's documented choice
    (docs/method.md §3.3).

Numpy only (no jax), so the theory can be evaluated anywhere. Shapes: see docs/method.md "Shape
letters": K tasks, T task dimension, W grid widths.
"""

from __future__ import annotations

import numpy as np

from rareret.errors import require
from rareret.synthetic.spec import TaskMixture

FREQUENT_MASS = 0.8  # Cumulative prior mass defining the frequent set F (docs/method.md §3.3).
MASS_TOLERANCE = 1e-12  # Round-off allowed when comparing cumulative priors with `mass`.
ROUNDOFF = 1e-6  # Negative δ_F down to −ROUNDOFF (alignments a hair above 1) counts as 0.
TIE = 1e-9  # Utilities within this relative distance are equal (exact ties, up to round-off).


def utilities(mixture: TaskMixture, priors=None) -> np.ndarray:
    """u_KxT = π_k λ_{k,j}, the eigenvalues of M = Σ_k π_k C_k (`priors`: π in place of the
    mixture's, e.g. `spec.multiplied_priors`)."""
    priors_K = mixture.prior_array() if priors is None else np.asarray(priors, np.float64)
    return priors_K[:, None] * mixture.spectra()


def feature_ranks(mixture: TaskMixture, priors=None) -> np.ndarray:
    """rank_KxT: 1-based position of feature (k, j) in the global descending utility order.

    Ties (utilities within a relative `TIE`): utility descending, then task index ascending,
    then j ascending. `priors` as in `utilities`.
    """
    utilities_KxT = utilities(mixture, priors)
    flat = utilities_KxT.ravel()
    by_value = np.argsort(-flat, kind="stable")
    # A new tie group starts wherever the next utility is more than TIE below the previous one.
    starts = np.concatenate([[0], flat[by_value][1:] < flat[by_value][:-1] * (1 - TIE)])
    group = np.empty(flat.size, dtype=np.int64)
    group[by_value] = np.cumsum(starts)
    order = np.lexsort((np.arange(flat.size), group))  # Within a group: row-major (task, j).
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(1, order.size + 1)
    return rank.reshape(utilities_KxT.shape)


def features_learned(mixture: TaskMixture, widths) -> np.ndarray:
    """n_WxK: n_k(N), the number of task-k features among the top N utilities, per width N."""
    widths_W = _check_widths(np.atleast_1d(widths), mixture.input_dim, "TaskMixture.input_dim")
    require(widths_W.ndim == 1, f"widths must be 1-D, got shape {widths_W.shape}")
    ranks_KxT = feature_ranks(mixture)
    return np.sum(ranks_KxT[None] <= widths_W[:, None, None], axis=-1)


def predicted_loss(mixture: TaskMixture, widths) -> np.ndarray:
    """loss_WxK: Theorem 3's ℓ*_k(N)/Tr(C_k) = Σ_{j ≥ n_k(N)} λ_{k,j} / Σ_j λ_{k,j} (0-based j).

    Spectra are sorted descending, so task k's learned features are its first n_k(N).
    """
    spectra_KxT = mixture.spectra()
    # tails_KxT1[k, n] = Σ_{j ≥ n} λ_{k,j}, n = 0..T (T1 = T + 1 columns).
    tails_KxT1 = np.cumsum(spectra_KxT[:, ::-1], axis=1)[:, ::-1]
    tails_KxT1 = np.concatenate([tails_KxT1, np.zeros((mixture.num_tasks, 1))], axis=1)
    learned_WxK = features_learned(mixture, widths)
    residual_WxK = np.take_along_axis(tails_KxT1, learned_WxK.T, axis=1).T
    return residual_WxK / tails_KxT1[:, 0]


def staircase(mixture: TaskMixture, m: int = 1, priors=None) -> np.ndarray:
    """N*_K(m) = min{N : n_k(N) ≥ m}, the rank of task k's m-th feature (m is 1-based);
    `priors` as in `utilities`."""
    _check_int("staircase.m", m, 1, mixture.task_dim)
    return feature_ranks(mixture, priors)[:, m - 1]


def frequent_tasks(priors, mass: float = FREQUENT_MASS) -> np.ndarray:
    """F: sorted indices of the smallest top-prior task set with cumulative mass ≥ `mass`.

    `priors` are normalised here; prior ties go to the lower index.
    """
    priors_K = np.asarray(priors, dtype=np.float64)
    require(priors_K.ndim == 1 and priors_K.size >= 1,
            f"frequent_tasks.priors must be a non-empty 1-D array, got shape {priors_K.shape}")
    require(bool(np.all(np.isfinite(priors_K)) and np.all(priors_K >= 0) and priors_K.sum() > 0),
            f"frequent_tasks.priors={priors_K.tolist()} must be finite, ≥ 0, with a positive sum")
    require(0 < mass <= 1, f"frequent_tasks.mass={mass!r} must be in (0, 1]")
    order = np.argsort(-priors_K, kind="stable")
    cumulative = np.cumsum(priors_K[order]) / priors_K.sum()
    count = int(np.searchsorted(cumulative, mass - MASS_TOLERANCE)) + 1
    return np.sort(order[:count])


def delta_f(mixture: TaskMixture, alignment, *, mass: float = FREQUENT_MASS) -> np.ndarray:
    """δ_F[...] = Σ_{k∈F} π_k (1 − s_k) Tr(C_k) for alignments s[..., K]."""
    alignment_xK = np.asarray(alignment, dtype=np.float64)
    require(alignment_xK.ndim >= 1 and alignment_xK.shape[-1] == mixture.num_tasks,
            f"delta_f.alignment has shape {alignment_xK.shape}; the last axis must be "
            f"TaskMixture.num_tasks={mixture.num_tasks}")
    frequent = frequent_tasks(mixture.prior_array(), mass)
    weights_K = mixture.prior_array() * mixture.traces()
    return np.sum(weights_K[frequent] * (1 - alignment_xK[..., frequent]), axis=-1)


def frequent_gradient_bound(mixture: TaskMixture, delta, *,
                            mass: float = FREQUENT_MASS) -> np.ndarray:
    """Theorem 4's bound on the frequent-task gradient, 2·sqrt(λ_1(M_F)·δ_F), elementwise."""
    delta = np.asarray(delta, dtype=np.float64)
    require(bool(np.all(delta >= -ROUNDOFF)),
            f"frequent_gradient_bound.delta={float(np.min(delta, initial=0.0))} must be ≥ 0")
    top = _frequent_spectrum(mixture, mass)[0]
    return 2 * np.sqrt(top * np.maximum(delta, 0))


def critical_width(mixture: TaskMixture, rare_task: int, feature: int = 0, *,
                   mass: float = FREQUENT_MASS, priors=None) -> int:
    """Proposition 6: N_r^crit = min{N ≥ 1 : μ_N^F ≤ π_r λ_{r,feature}}.

    μ^F are the eigenvalues of M_F = Σ_{k∈F} π_k C_k in descending order (μ_N = 0 past the
    nonzero ones); an eigenvalue tied with the rare utility (within `TIE`) counts as ≤ it.
    `rare_task` and `feature` are 0-based; `rare_task` must not be in F. `priors` as in
    `utilities` (F is then that of `priors`).
    """
    _check_rare_task(mixture, rare_task, mass, priors)
    _check_int("critical_width.feature", feature, 0, mixture.task_dim - 1)
    threshold = utilities(mixture, priors)[rare_task, feature]
    return 1 + int(np.sum(_frequent_spectrum(mixture, mass, priors) > threshold * (1 + TIE)))


def delta_f_threshold(mixture: TaskMixture, rare_task: int, *,
                      mass: float = FREQUENT_MASS) -> float:
    """Proposition 6 in δ_F units: the residual common-task signal at the rare critical width.

    A model that has captured every eigen-direction of M_F with eigenvalue above the rare top
    utility π_r λ_{r,1} (what Proposition 6 asks of width N_r^crit) leaves
    δ_F = Σ {μ ∈ eig(M_F) : μ ≤ π_r λ_{r,1}}. Below it the rare feature out-competes what remains
    of the frequent tasks (the paper: the rare signal jumps once δ_F drops below ≈ 1e-2; 1.03e-2
    here at the paper's configuration with spectrum_norm='first', 6.4e-3 with 'trace': δ_F
    scales with the spectrum). Eigenvalues tied with π_r λ_{r,1} (within `TIE`) count as ≤ it,
    as in `critical_width`. `rare_task` is 0-based and must not be in F.
    """
    _check_rare_task(mixture, rare_task, mass)
    rare_top = utilities(mixture)[rare_task, 0]
    mu = _frequent_spectrum(mixture, mass)
    return float(mu[mu <= rare_top * (1 + TIE)].sum())


def alignment_random_level(width, input_dim: int) -> np.ndarray:
    """N/D: the expected alignment s_k of a random width-N subspace of R^D."""
    _check_int("input_dim", input_dim, 1, None)
    return _check_widths(width, input_dim, "input_dim", name="width") / input_dim


def corrected_alignment(s, width, input_dim: int) -> np.ndarray:
    """s̃ = (s − N/D)/(1 − N/D), broadcasting; NaN where N = D (no room above chance)."""
    level = alignment_random_level(width, input_dim)
    room = np.where(level < 1, 1 - level, 1.0)
    return np.where(level < 1, (np.asarray(s, dtype=np.float64) - level) / room, np.nan)


def example7_decay(eta, gaps) -> np.ndarray:
    """Example 7: the factor e^(−2ηG) by which G common steps shrink a rare alignment."""
    eta, gaps = np.asarray(eta, dtype=np.float64), np.asarray(gaps, dtype=np.float64)
    require(bool(np.all(eta >= 0)), f"example7_decay.eta={eta.tolist()} must be ≥ 0")
    require(bool(np.all(gaps >= 0)), f"example7_decay.gaps={gaps.tolist()} must be ≥ 0")
    return np.exp(-2 * eta * gaps)


def _frequent_spectrum(mixture: TaskMixture, mass: float, priors=None) -> np.ndarray:
    """Eigenvalues of M_F on the frequent tasks' blocks (all others are 0), descending."""
    frequent = frequent_tasks(mixture.prior_array() if priors is None else priors, mass)
    return np.sort(utilities(mixture, priors)[frequent].ravel())[::-1]


def _check_rare_task(mixture: TaskMixture, rare_task: int, mass: float, priors=None) -> None:
    """Requires `rare_task` to be a valid 0-based task index outside F."""
    _check_int("rare_task", rare_task, 0, mixture.num_tasks - 1)
    frequent = frequent_tasks(mixture.prior_array() if priors is None else priors, mass)
    require(rare_task not in frequent,
            f"rare_task={rare_task} is in the frequent set F={frequent.tolist()} "
            f"(mass {mass}); pick a task outside F")


def _check_int(name: str, value, low: int, high: int | None) -> None:
    """Requires `value` to be an integer in [low, high] (high=None: unbounded)."""
    bound = f"≥ {low}" if high is None else f"in {low}..{high}"
    require(isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            and low <= value and (high is None or value <= high),
            f"{name}={value!r} must be an integer {bound}")


def _check_widths(widths, input_dim: int, limit: str, name: str = "widths") -> np.ndarray:
    """Widths as an int array: each an integer in 1..input_dim (`limit` names the bound)."""
    widths = np.asarray(widths)
    require(np.issubdtype(widths.dtype, np.integer),
            f"{name}={widths.tolist()} must be integers")
    for width in widths.ravel().tolist():
        require(width >= 1, f"{name}: width {width} must be ≥ 1")
        require(width <= input_dim, f"{name}: width {width} exceeds {limit}={input_dim}")
    return widths

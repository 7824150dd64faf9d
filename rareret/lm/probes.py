"""Representation probes for the injected LM tasks (docs/method.md §6.8; paper: T_CMP value R²,
T_ADD Fourier modes).

Pure numpy (float64) functions of activations, independent of the model code, so they can be
tested on planted data. The training loop extracts the activations (`model.apply_with_hidden`)
on held-out (test) instances and calls these; what it feeds in is its choice, not this module's.

T_CMP, `value_r2` — does the representation encode val(token) linearly? The paper regresses
val(token) on the representations of the task's 100 tokens projected onto their top-50 principal
components and reports R². Here:
  - rows: one representation per token of S ([tokens, D], 100 rows), target val(token) ∈ 0..99;
  - folds: held-out R² by NUM_FOLDS = 10-fold cross-validation. The rows are permuted by a
    generator seeded by (seed, 0) and cut into 10 near-equal folds (`np.array_split`), so the
    assignment is deterministic given `seed`;
  - features: inside each training fold only (no leakage), the rows are centred on the training
    mean and the top k principal components are fitted (SVD), with
    k = min(NUM_COMPONENTS = 50, D, n_train − 1) (a centred n_train-row matrix has rank at most
    n_train − 1); components with a singular value at round-off level are dropped. The test fold
    is centred on the *training* mean and projected on the same components;
  - regression: ordinary least squares with an intercept (no ridge), the paper's "linear
    regression". With 50 features on 90 training points it has no tuning parameter, but it is
    noisy: on features unrelated to val the held-out R² is well below 0 (the out-of-fold error
    is about 1 + 50/39 times the variance), whereas the in-sample R² of the same fit on all 100
    rows is about 50/99 ≈ 0.5 by chance alone (`value_r2_in_sample`), which is why R² is held out;
  - R²: pooled over folds, 1 − Σ(y − ŷ_out-of-fold)² / Σ(y − ȳ)² with ȳ the mean of all rows.
    It is ≤ 1, may be negative (worse than predicting the training mean), and is ≤ 0 (up to
    round-off) for constant representations;
  - null: the same statistic with the values permuted across tokens (same folds and components),
    averaged over NUM_NULL = 10 permutations drawn by a generator seeded by (seed, 1).
  `value_r2` returns (r2, r2_null); non-finite representations give (nan, nan).

T_ADD, `fourier_power` / `fourier_modes` — does the representation use Fourier features of the
answer (a + b) mod P? Per layer, the paper takes the mean residual vector of the instances of each
output class c (`class_means`: a [classes, D] matrix, P = 100 classes), centres it over classes
(subtracts the mean row), and measures the fraction of its variance (squared Frobenius norm)
carried by each frequency k = 1..P/2 of the real DFT basis over the class index: the cos and sin
vectors cos(2πkc/P), sin(2πkc/P), normalised, with only the cos vector at k = P/2 for even P
(its sin vector is 0). Together with the constant vector these P vectors are an orthonormal basis
of R^P, and the centred matrix is orthogonal to the constant, so the fractions sum to 1 (Parseval).
They are unchanged by any rotation of the representation space (orthogonal D × D map).

Null level 2/(P−1): the centred matrix lives in the P−1 non-constant directions of R^P; a random
(isotropic) one spreads its variance evenly over them, 1/(P−1) each, and a frequency owns 2 of
them (cos and sin), so it expects 2/(P−1). A frequency is a *mode* if its fraction exceeds
NULL_MULTIPLE = 2 times that, i.e. 4/(P−1) (≈ 0.0404 at P = 100). The one-vector frequency P/2
expects only 1/(P−1) and is held to the same threshold, as in the paper (conservative there).
The paper's count sums `fourier_modes` over layers; the caller does that sum.

Shapes: see docs/method.md "Shape letters": B instances (rows of `class_means`), D d_model. P is
the parameter axis in this repo, so the class axis [classes], the token axis [tokens] and the
frequency axis [frequencies] (k = 1..classes // 2) have no letter and are spelt out here.
"""

from __future__ import annotations

import numpy as np

from rareret.errors import is_int, require

NUM_COMPONENTS = 50  # Top principal components for the T_CMP regression (paper).
NUM_FOLDS = 10  # Cross-validation folds for the held-out R².
NUM_NULL = 10  # Label permutations averaged into the null R².
NULL_MULTIPLE = 2  # A Fourier mode needs more than NULL_MULTIPLE × the null fraction 2/(P−1).
_FOLDS, _NULL = 0, 1  # Seed tags: fold assignment, label permutations.
_ROUNDOFF = 64 * np.finfo(np.float64).eps  # Relative level treated as zero.


# ----------------------------------------------------------------------------- T_CMP

def _check_regression_inputs(token_reps, values, name: str) -> tuple[np.ndarray, np.ndarray]:
    reps = np.asarray(token_reps, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    require(reps.ndim == 2 and reps.shape[1] >= 1 and y.shape == (reps.shape[0],),
            f"{name}: token_reps {reps.shape} must be [tokens, D ≥ 1] and values {y.shape} "
            "[tokens]")
    require(np.all(np.isfinite(y)) and np.ptp(y) > 0,
            f"{name}: values must be finite and not all equal (R² is undefined otherwise)")
    return reps, y


def _components(train: np.ndarray, num_components: int) -> tuple[np.ndarray, np.ndarray]:
    """(training mean [D], top principal directions [k, D]) of the rows of `train`, with
    k = min(num_components, D, rows − 1) and directions at round-off level dropped."""
    mean = train.mean(axis=0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    k = min(num_components, train.shape[1], train.shape[0] - 1)
    scale = max(s[0] if s.size else 0.0, np.sqrt(train.shape[0]) * np.max(np.abs(train)))
    keep = s[:k] > _ROUNDOFF * max(train.shape) * scale
    return mean, vt[:k][keep]


def _fit_predict(train, y_train, test, num_components: int) -> np.ndarray:
    """Least squares (with intercept) of each column of y_train [rows, targets] on the top
    principal components of `train`; predictions for `test` [test rows, targets]."""
    mean, directions = _components(train, num_components)
    z_train, z_test = (train - mean) @ directions.T, (test - mean) @ directions.T
    y_mean = y_train.mean(axis=0)
    # The columns of z_train are orthogonal (U·s), so least squares is a per-column projection.
    norms = np.sum(z_train * z_train, axis=0)
    coefficients = (z_train.T @ (y_train - y_mean)) / norms[:, None]
    return y_mean + z_test @ coefficients


def _r2(y: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """1 − Σ(y − ŷ)² / Σ(y − ȳ)² per column of predictions [rows, targets] (y [rows] or same)."""
    y = y if y.ndim == 2 else y[:, None]
    total = np.sum((y - y.mean(axis=0)) ** 2, axis=0)
    return 1.0 - np.sum((y - predictions) ** 2, axis=0) / total


def value_r2(token_reps, values, *, num_components: int = NUM_COMPONENTS,
             num_folds: int = NUM_FOLDS, num_null: int = NUM_NULL,
             seed: int = 0) -> tuple[float, float]:
    """(held-out R², null R²) of val(token) regressed on top principal components (module doc).

    token_reps: [tokens, D] one representation per token (any float dtype; computed in float64).
    values: [tokens] val(token), e.g. 0..99; not all equal.
    num_folds: K of K-fold cross-validation (2 ≤ K ≤ tokens); folds seeded by (seed, 0).
    num_null: permutations of `values` averaged into the null (≥ 1), seeded by (seed, 1).
    Deterministic given the inputs and `seed`. Non-finite token_reps give (nan, nan).
    """
    reps, y = _check_regression_inputs(token_reps, values, "value_r2")
    rows = reps.shape[0]
    require(is_int(num_components) and num_components >= 1,
            f"value_r2: num_components={num_components!r} must be an integer ≥ 1")
    require(is_int(num_folds) and 2 <= num_folds <= rows,
            f"value_r2: num_folds={num_folds!r} must be an integer in [2, {rows}] (rows)")
    require(is_int(num_null) and num_null >= 1,
            f"value_r2: num_null={num_null!r} must be an integer ≥ 1")
    require(is_int(seed) and seed >= 0, f"value_r2: seed={seed!r} must be an integer ≥ 0")
    if not np.all(np.isfinite(reps)):
        return float("nan"), float("nan")
    null_rng = np.random.default_rng([seed, _NULL])
    targets = np.stack([y] + [y[null_rng.permutation(rows)] for _ in range(num_null)], axis=1)
    folds = np.array_split(np.random.default_rng([seed, _FOLDS]).permutation(rows), num_folds)
    predictions = np.empty_like(targets)
    for test_rows in folds:
        train_rows = np.setdiff1d(np.arange(rows), test_rows)
        predictions[test_rows] = _fit_predict(reps[train_rows], targets[train_rows],
                                              reps[test_rows], num_components)
    r2 = _r2(targets, predictions)
    return float(r2[0]), float(np.mean(r2[1:]))


def value_r2_in_sample(token_reps, values, *, num_components: int = NUM_COMPONENTS) -> float:
    """In-sample R² of the same fit on all rows (PCA and least squares on every token, scored on
    the same tokens). A diagnostic of overfitting, not the paper's measure: with 50 components on
    100 tokens it is about 0.5 even for representations unrelated to val."""
    reps, y = _check_regression_inputs(token_reps, values, "value_r2_in_sample")
    require(is_int(num_components) and num_components >= 1,
            f"value_r2_in_sample: num_components={num_components!r} must be an integer ≥ 1")
    if not np.all(np.isfinite(reps)):
        return float("nan")
    return float(_r2(y, _fit_predict(reps, y[:, None], reps, num_components))[0])


# ----------------------------------------------------------------------------- T_ADD

def class_means(reps_BxD, classes_B, num_classes: int) -> np.ndarray:
    """[classes, D] float64: row c is the mean of the rows of reps_BxD whose class is c.

    classes_B: integer classes in [0, num_classes), e.g. (val(TOK1) + val(TOK2)) mod 100.
    Every class must have at least one instance (ConfigError otherwise): an empty class has no
    mean, and the Fourier analysis needs all of them. The 5,000 test instances of T_ADD cover
    every class (50 each on average); a few hundred of them almost always do.
    """
    reps = np.asarray(reps_BxD, dtype=np.float64)
    classes = np.asarray(classes_B)
    require(reps.ndim == 2 and classes.shape == (reps.shape[0],),
            f"class_means: reps {reps.shape} must be [B, D] and classes {classes.shape} [B]")
    require(is_int(num_classes) and num_classes >= 1,
            f"class_means: num_classes={num_classes!r} must be an integer ≥ 1")
    require(np.issubdtype(classes.dtype, np.integer)
            and np.all((classes >= 0) & (classes < num_classes)),
            f"class_means: classes must be integers in [0, {num_classes})")
    counts = np.bincount(classes, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    require(empty.size == 0,
            f"class_means: {empty.size} classes have no instance (first: {empty[:5].tolist()}); "
            "use more instances")
    sums = np.zeros((num_classes, reps.shape[1]))
    np.add.at(sums, classes, reps)
    return sums / counts[:, None]


def fourier_basis(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(orthonormal real DFT vectors [directions, classes], frequency of each [directions]).

    For k = 1..num_classes // 2: cos(2πkc/P) and, unless 2k = P, sin(2πkc/P), each normalised;
    P − 1 directions in all, orthogonal to the constant vector.
    """
    require(is_int(num_classes) and num_classes >= 3,
            f"fourier_basis: num_classes={num_classes!r} must be an integer ≥ 3")
    c = np.arange(num_classes)
    vectors, frequency = [], []
    for k in range(1, num_classes // 2 + 1):
        angle = 2 * np.pi * k * c / num_classes
        for vector in (np.cos(angle), np.sin(angle)) if 2 * k != num_classes else (np.cos(angle),):
            vectors.append(vector / np.linalg.norm(vector))
            frequency.append(k)
    return np.stack(vectors), np.asarray(frequency)


def fourier_power(means) -> np.ndarray:
    """power_by_frequency [frequencies]: the fraction of the class-centred variance of the class
    means [classes, D] carried by each frequency k = 1..classes // 2 (module doc).

    Sums to 1 up to round-off. Class means that do not vary over classes (variance at round-off
    level) give all zeros (no modes); non-finite input gives all NaN.
    """
    means = np.asarray(means, dtype=np.float64)
    require(means.ndim == 2 and means.shape[0] >= 3,
            f"fourier_power: class means {means.shape} must be [classes ≥ 3, D]")
    num_classes = means.shape[0]
    num_frequencies = num_classes // 2
    if not np.all(np.isfinite(means)):
        return np.full(num_frequencies, np.nan)
    centred = means - means.mean(axis=0)
    total = np.sum(centred * centred)
    if total <= (_ROUNDOFF * np.linalg.norm(means)) ** 2:
        return np.zeros(num_frequencies)
    basis, frequency = fourier_basis(num_classes)
    energy = np.sum((basis @ centred) ** 2, axis=1)  # [directions]
    return np.bincount(frequency - 1, weights=energy, minlength=num_frequencies) / total


def fourier_null(num_classes: int) -> float:
    """2/(P−1): the fraction a frequency expects from an isotropic random centred matrix."""
    require(is_int(num_classes) and num_classes >= 3,
            f"fourier_null: num_classes={num_classes!r} must be an integer ≥ 3")
    return 2.0 / (num_classes - 1)


def mode_frequencies(power_by_frequency, num_classes: int) -> np.ndarray:
    """The frequencies k (1-based) whose fraction exceeds NULL_MULTIPLE × 2/(P−1)."""
    power = np.asarray(power_by_frequency, dtype=np.float64)
    require(power.shape == (num_classes // 2,),
            f"mode_frequencies: power {power.shape} must be [{num_classes // 2}] "
            f"(frequencies 1..{num_classes} // 2)")
    return np.flatnonzero(power > NULL_MULTIPLE * fourier_null(num_classes)) + 1


def fourier_modes(power_by_frequency, num_classes: int) -> int:
    """The number of Fourier modes: frequencies whose fraction exceeds NULL_MULTIPLE × 2/(P−1)
    (NaN fractions count as no mode). The paper sums this over layers."""
    return int(mode_frequencies(power_by_frequency, num_classes).size)

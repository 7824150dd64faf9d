"""Representation probes (rareret/lm/probes.py) on planted data: T_CMP value R², T_ADD Fourier
modes."""

import numpy as np
import pytest

from rareret.errors import ConfigError
from rareret.lm.probes import (
    class_means, fourier_basis, fourier_modes, fourier_power, mode_frequencies, value_r2,
    value_r2_in_sample)

P, TOKENS = 100, 100


# ----------------------------------------------------------------------------- T_ADD

def planted_means(frequencies, d=64, noise=0.02, seed=0):
    """[P, D] class means: cos and sin of each planted frequency along random directions."""
    rng = np.random.default_rng(seed)
    c = np.arange(P)[:, None]
    means = rng.normal(size=(1, d)) + noise * rng.normal(size=(P, d))  # Offset + noise.
    for k in frequencies:
        cos_dir, sin_dir = rng.normal(size=(2, d))
        angle = 2 * np.pi * k * c / P
        means = means + np.cos(angle) * cos_dir + np.sin(angle) * sin_dir
    return means


def test_planted_fourier_modes_are_found_at_their_frequencies():
    power = fourier_power(planted_means([3, 17, 41]))
    assert power.shape == (P // 2,)
    assert fourier_modes(power, P) == 3
    np.testing.assert_array_equal(mode_frequencies(power, P), [3, 17, 41])
    assert power[[2, 16, 40]].sum() > 0.99


@pytest.mark.parametrize("seed", range(5))
def test_noise_has_no_fourier_modes(seed):
    power = fourier_power(np.random.default_rng(seed).normal(size=(P, 64)))
    assert fourier_modes(power, P) == 0
    assert power.max() < 2 * 2 / (P - 1)


@pytest.mark.parametrize("num_classes", [100, 7])
def test_power_sums_to_one_and_basis_is_orthonormal(num_classes):
    basis, frequency = fourier_basis(num_classes)
    assert basis.shape == (num_classes - 1, num_classes)
    full = np.vstack([np.full(num_classes, num_classes ** -0.5), basis])
    np.testing.assert_allclose(full @ full.T, np.eye(num_classes), atol=1e-12)
    np.testing.assert_array_equal(np.bincount(frequency)[1:],
                                  [2] * ((num_classes - 1) // 2) + [1] * (num_classes % 2 == 0))
    means = np.random.default_rng(1).normal(size=(num_classes, 16)) ** 3  # Non-Gaussian.
    assert abs(fourier_power(means).sum() - 1) < 1e-12
    assert abs(fourier_power(planted_means([5])).sum() - 1) < 1e-12


def test_power_matches_the_fft():
    means = planted_means([2, 50], noise=0.5, seed=4)  # k = 50 = P/2: the cos-only frequency.
    spectrum = np.fft.rfft(means - means.mean(0), axis=0)[1:]  # Frequencies 1..P/2.
    directions = np.where(np.arange(1, P // 2 + 1) < P / 2, 2, 1)  # cos + sin, or cos only.
    energy = np.sum(np.abs(spectrum) ** 2, axis=1) * directions / P
    np.testing.assert_allclose(fourier_power(means), energy / energy.sum(), atol=1e-12)


def test_rotation_leaves_power_unchanged():
    rng = np.random.default_rng(2)
    means = planted_means([4, 9], noise=0.3, seed=2)
    rotation, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    np.testing.assert_allclose(fourier_power(means @ rotation), fourier_power(means), atol=1e-12)


def test_constant_and_nonfinite_means():
    assert np.all(fourier_power(np.full((P, 8), 0.1)) == 0)
    assert fourier_modes(fourier_power(np.full((P, 8), 0.1)), P) == 0
    bad = np.ones((P, 8))
    bad[3, 2] = np.nan
    assert np.all(np.isnan(fourier_power(bad)))


def test_class_means():
    rng = np.random.default_rng(3)
    classes_B = np.concatenate([np.arange(P), rng.integers(0, P, size=400)])
    reps_BxD = rng.normal(size=(len(classes_B), 5)).astype(np.float32)
    means = class_means(reps_BxD, classes_B, P)
    assert means.shape == (P, 5) and means.dtype == np.float64
    for c in (0, 42, 99):
        np.testing.assert_allclose(means[c], reps_BxD[classes_B == c].astype(np.float64).mean(0))
    with pytest.raises(ConfigError, match="no instance"):
        class_means(reps_BxD[:50], classes_B[:50], P)


# ----------------------------------------------------------------------------- T_CMP

def token_values(seed):
    return np.random.default_rng([seed, 7]).permutation(TOKENS).astype(float)


@pytest.mark.parametrize("seed", range(3))
def test_planted_value_direction_is_recovered(seed):
    rng = np.random.default_rng(seed)
    values = token_values(seed)
    d = 128
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    standardised = (values - values.mean()) / values.std()
    reps = (standardised[:, None] * u + 0.05 * rng.normal(size=(TOKENS, d))
            + rng.normal(size=(TOKENS, 10)) @ rng.normal(size=(10, d)))  # Random directions.
    r2, r2_null = value_r2(reps, values, seed=seed)
    assert r2 > 0.95
    assert r2_null < 0.05


def test_random_features_are_not_inflated():
    in_sample = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        values = token_values(seed)
        reps = rng.normal(size=(TOKENS, 128))
        r2, r2_null = value_r2(reps, values, seed=seed)
        assert r2 <= 0.1 and r2_null <= 0.1, seed
        in_sample.append(value_r2_in_sample(reps, values))
    # The same fit scored in-sample: 50 components on 100 tokens explain ~50/99 by chance
    # (R² ~ Beta(25, 24.5), sd 0.07, so one seed may dip below 0.4; their mean does not).
    assert np.mean(in_sample) > 0.4 and min(in_sample) > 0.3, in_sample


def reference_value_r2(reps, values, seed, num_folds=10, num_null=10, components=50):
    """Straightforward re-implementation: documented folds and permutations, PCA on the training
    fold, least squares with an explicit intercept column (np.linalg.lstsq), pooled R²."""
    rows = len(values)
    null_rng = np.random.default_rng([seed, 1])
    targets = [values] + [values[null_rng.permutation(rows)] for _ in range(num_null)]
    folds = np.array_split(np.random.default_rng([seed, 0]).permutation(rows), num_folds)
    scores = []
    for y in targets:
        predicted = np.empty(rows)
        for test in folds:
            train = np.setdiff1d(np.arange(rows), test)
            mean = reps[train].mean(0)
            k = min(components, reps.shape[1], len(train) - 1)
            directions = np.linalg.svd(reps[train] - mean)[2][:k]
            design = np.c_[np.ones(len(train)), (reps[train] - mean) @ directions.T]
            weights = np.linalg.lstsq(design, y[train], rcond=None)[0]
            test_design = np.c_[np.ones(len(test)), (reps[test] - mean) @ directions.T]
            predicted[test] = test_design @ weights
        scores.append(1 - np.sum((y - predicted) ** 2) / np.sum((y - y.mean()) ** 2))
    return scores[0], np.mean(scores[1:])


@pytest.mark.parametrize("d", [128, 20])
def test_matches_reference_implementation(d):
    rng = np.random.default_rng(8)
    values = token_values(8)
    reps = rng.normal(size=(TOKENS, d)) + 0.05 * values[:, None] * rng.normal(size=d)
    np.testing.assert_allclose(value_r2(reps, values, seed=3), reference_value_r2(reps, values, 3),
                               atol=1e-9)


def test_deterministic_given_seed():
    rng = np.random.default_rng(5)
    values = token_values(5)
    reps = rng.normal(size=(TOKENS, 32)) + 0.1 * values[:, None]
    first = value_r2(reps, values, seed=11)
    assert value_r2(reps, values, seed=11) == first
    assert value_r2(reps, values, seed=12) != first  # The seed sets folds and permutations.


def test_narrow_and_degenerate_representations():
    values = token_values(0)
    rng = np.random.default_rng(6)
    # D < 50: k = D components; a 2-D representation holding val fits exactly.
    narrow = np.stack([values, rng.normal(size=TOKENS)], axis=1)
    r2, _ = value_r2(narrow, values)
    assert r2 > 1 - 1e-9
    # Constant representations carry nothing: R² ≤ 0, never NaN.
    for constant in (np.zeros((TOKENS, 64)), np.full((TOKENS, 64), 0.1)):
        r2, r2_null = value_r2(constant, values)
        assert np.isfinite(r2) and np.isfinite(r2_null)
        assert r2 <= 1e-12 and r2_null <= 1e-12
    bad = rng.normal(size=(TOKENS, 8))
    bad[0, 0] = np.nan
    assert all(np.isnan(value_r2(bad, values)))
    with pytest.raises(ConfigError):
        value_r2(narrow, np.zeros(TOKENS))

"""The closed-form theory of PAPER.md §1 as a specification."""

import subprocess
import sys

import numpy as np
import pytest

from rareret.errors import ConfigError
from rareret.synthetic import theory
from rareret.synthetic.spec import TaskMixture

RANK1 = TaskMixture(num_tasks=16, task_dim=1, input_dim=16, beta=1.0)
# K=2, T=2, π = [0.6, 0.4], λ ∝ [1, 1/2] = [2/3, 1/3]. Utilities: task 0 [0.4, 0.2],
# task 1 [0.2667, 0.1333] → global order (0,0), (1,0), (0,1), (1,1).
SMALL = TaskMixture(num_tasks=2, task_dim=2, input_dim=4, priors=[0.6, 0.4], alpha=1.0)
MIXED = TaskMixture(num_tasks=6, task_dim=3, input_dim=24, beta=1.5, complexity_range=(1, 3))


def test_module_does_not_import_jax():
    code = "import sys, rareret.synthetic.theory; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rank1_staircase_is_task_index():
    np.testing.assert_array_equal(theory.staircase(RANK1, m=1), np.arange(1, 17))


def test_rank1_loss_is_a_step():
    widths = np.arange(1, 17)
    loss_WxK = theory.predicted_loss(RANK1, widths)
    task_K = np.arange(1, 17)
    np.testing.assert_array_equal(loss_WxK, (task_K[None] > widths[:, None]).astype(float))


def test_small_case_by_hand():
    np.testing.assert_allclose(theory.utilities(SMALL),
                               [[0.4, 0.2], [0.8 / 3, 0.4 / 3]])
    np.testing.assert_array_equal(theory.feature_ranks(SMALL), [[1, 3], [2, 4]])
    np.testing.assert_array_equal(theory.features_learned(SMALL, [1, 2, 3, 4]),
                                  [[1, 0], [1, 1], [2, 1], [2, 2]])
    np.testing.assert_allclose(theory.predicted_loss(SMALL, [1, 2, 3, 4]),
                               [[1 / 3, 1.0], [1 / 3, 1 / 3], [0.0, 1 / 3], [0.0, 0.0]])
    np.testing.assert_array_equal(theory.staircase(SMALL, m=2), [3, 4])


def test_utility_ties_break_by_task_then_feature():
    tied = TaskMixture(num_tasks=2, task_dim=2, input_dim=4, priors=[1, 1], alpha=0.0)
    np.testing.assert_array_equal(theory.feature_ranks(tied), [[1, 2], [3, 4]])


def test_features_learned_in_descending_utility_order():
    utilities_KxT = theory.utilities(MIXED)
    ranks_KxT = theory.feature_ranks(MIXED)
    by_rank = utilities_KxT.ravel()[np.argsort(ranks_KxT.ravel())]
    assert np.all(np.diff(by_rank) <= 0)
    widths = np.arange(1, MIXED.input_dim + 1)
    learned_WxK = theory.features_learned(MIXED, widths)
    np.testing.assert_array_equal(learned_WxK.sum(axis=1), np.minimum(widths, 6 * 3))
    # Each width adds the highest-utility feature not yet learned.
    for n, learned_K in zip(widths, learned_WxK):
        chosen = utilities_KxT[np.arange(3)[None] < learned_K[:, None]]
        rest = utilities_KxT[np.arange(3)[None] >= learned_K[:, None]]
        assert chosen.size == min(n, 18)
        assert rest.size == 0 or chosen.min() >= rest.max()


def test_loss_matches_spectrum_tail_and_is_monotone():
    widths = np.arange(1, MIXED.input_dim + 1)
    loss_WxK = theory.predicted_loss(MIXED, widths)
    learned_WxK = theory.features_learned(MIXED, widths)
    spectra_KxT = MIXED.spectra()
    for w, k in np.ndindex(loss_WxK.shape):
        expected = spectra_KxT[k, learned_WxK[w, k]:].sum() / spectra_KxT[k].sum()
        assert loss_WxK[w, k] == pytest.approx(expected)
    assert np.all(np.diff(loss_WxK, axis=0) <= 0)


def test_staircase_non_decreasing_in_m():
    steps_MxK = np.stack([theory.staircase(MIXED, m) for m in range(1, 4)])
    assert np.all(np.diff(steps_MxK, axis=0) > 0)
    learned_WxK = theory.features_learned(MIXED, np.arange(1, 25))
    for m, steps_K in enumerate(steps_MxK, start=1):
        first_WxK = np.argmax(learned_WxK >= m, axis=0) + 1
        np.testing.assert_array_equal(steps_K, first_WxK)


@pytest.mark.parametrize("priors, mass, expected", [
    ([0.5, 0.3, 0.1, 0.1], 0.8, [0, 1]),
    ([0.1, 0.3, 0.5, 0.1], 0.8, [1, 2]),
    ([0.25, 0.25, 0.25, 0.25], 0.5, [0, 1]),
    ([0.2, 0.4, 0.4], 0.3, [1]),
    ([0.5, 0.3, 0.1, 0.1], 0.81, [0, 1, 2]),
    ([0.5, 0.3, 0.1, 0.1], 1.0, [0, 1, 2, 3]),
    ([5, 3, 1, 1], 0.8, [0, 1]),
    ([0.1] * 10, 0.8, list(range(8))),  # Cumulative sum is 0.7999999999999999 in floats.
])
def test_frequent_tasks(priors, mass, expected):
    np.testing.assert_array_equal(theory.frequent_tasks(priors, mass), expected)


def test_paper_default_frequent_set():
    priors = TaskMixture(num_tasks=32, beta=2.0).prior_array()
    frequent = theory.frequent_tasks(priors)
    assert priors[frequent].sum() >= 0.8 > priors[frequent[:-1]].sum()


def _frequent_matrix_DxD(mixture, rng):
    """M_F as an explicit D×D matrix, randomly rotated so no structure is shared."""
    frequent = theory.frequent_tasks(mixture.prior_array())
    diag_D = np.zeros(mixture.input_dim)
    for k in frequent:
        diag_D[mixture.block(int(k))] = mixture.prior_array()[k] * mixture.spectra()[k]
    rotation_DxD, _ = np.linalg.qr(rng.normal(size=(mixture.input_dim,) * 2))
    return rotation_DxD @ np.diag(diag_D) @ rotation_DxD.T


@pytest.mark.parametrize("mixture", [
    MIXED,
    TaskMixture(num_tasks=8, task_dim=4, input_dim=40, beta=0.5, alpha=1.0),
    TaskMixture(num_tasks=8, task_dim=1, input_dim=8, beta=2.0),
])
def test_critical_width_against_brute_force(mixture):
    mu_D = np.sort(np.linalg.eigvalsh(_frequent_matrix_DxD(mixture, np.random.default_rng(0))))
    mu_D = np.clip(mu_D[::-1], 0, None)
    frequent = theory.frequent_tasks(mixture.prior_array())
    utilities_KxT = theory.utilities(mixture)
    checked = 0
    for r in sorted(set(range(mixture.num_tasks)) - set(frequent.tolist())):
        for j in range(mixture.task_dim):
            threshold = utilities_KxT[r, j]
            brute = 1 + next(n for n in range(mixture.input_dim)
                             if mu_D[n] <= threshold * (1 + 1e-9))
            assert theory.critical_width(mixture, r, j) == brute
            checked += 1
    assert checked > 0


def test_delta_f():
    priors_K = MIXED.prior_array()
    frequent = theory.frequent_tasks(priors_K)
    assert theory.delta_f(MIXED, np.ones(6)) == 0
    assert theory.delta_f(MIXED, np.zeros(6)) == pytest.approx(priors_K[frequent].sum())
    alignment_2x3xK = np.random.default_rng(1).uniform(size=(2, 3, 6))
    delta_2x3 = theory.delta_f(MIXED, alignment_2x3xK)
    assert delta_2x3.shape == (2, 3)
    expected = sum(priors_K[k] * (1 - alignment_2x3xK[..., k]) for k in frequent)
    np.testing.assert_allclose(delta_2x3, expected)


def test_gradient_bound_and_threshold():
    frequent = theory.frequent_tasks(MIXED.prior_array())
    top_frequent = theory.utilities(MIXED)[frequent].max()
    np.testing.assert_allclose(theory.frequent_gradient_bound(MIXED, [0.0, 0.25]),
                               [0.0, 2 * np.sqrt(top_frequent * 0.25)])
    rare = 5
    rare_top = theory.utilities(MIXED)[rare, 0]
    frequent_utilities = theory.utilities(MIXED)[frequent].ravel()
    # A model holding the frequent directions above the rare utility leaves exactly the rest.
    expected = frequent_utilities[frequent_utilities <= rare_top].sum()
    assert theory.delta_f_threshold(MIXED, rare) == pytest.approx(expected)
    assert 0 < expected < frequent_utilities.sum()
    # Consistent with Proposition 6: the first N_crit − 1 eigenvalues of M_F exceed the threshold's.
    n_crit = theory.critical_width(MIXED, rare)
    mu = np.sort(frequent_utilities)[::-1]
    assert mu[n_crit - 1:].sum() == pytest.approx(expected)


def test_alignment_chance_correction():
    assert theory.alignment_random_level(32, 1024) == pytest.approx(1 / 32)
    np.testing.assert_allclose(theory.corrected_alignment([32 / 1024, 1.0], 32, 1024), [0, 1])
    np.testing.assert_allclose(theory.corrected_alignment(0.5, [8, 16], 16), [0.0, np.nan])
    np.testing.assert_allclose(theory.corrected_alignment(0.75, 8, 16), 0.5)


def test_example7_decay():
    np.testing.assert_allclose(theory.example7_decay(0.01, [0, 100]), [1.0, np.exp(-2.0)])


@pytest.mark.parametrize("call, message", [
    (lambda: theory.predicted_loss(TaskMixture(input_dim=1024), [32, 2048]),
     "widths: width 2048 exceeds TaskMixture.input_dim=1024"),
    (lambda: theory.features_learned(SMALL, [0, 1]), "widths: width 0 must be ≥ 1"),
    (lambda: theory.features_learned(SMALL, [1.5]), r"widths=\[1.5\] must be integers"),
    (lambda: theory.staircase(SMALL, m=0), "staircase.m=0 must be an integer in 1..2"),
    (lambda: theory.staircase(SMALL, m=3), "staircase.m=3 must be an integer in 1..2"),
    (lambda: theory.frequent_tasks([0.5, 0.5], mass=1.5), "frequent_tasks.mass=1.5"),
    (lambda: theory.frequent_tasks([0.5, -0.5]), r"frequent_tasks.priors=\[0.5, -0.5\]"),
    (lambda: theory.critical_width(MIXED, 0), r"rare_task=0 is in the frequent set F=\[0"),
    (lambda: theory.critical_width(MIXED, 6), "rare_task=6 must be an integer in 0..5"),
    (lambda: theory.critical_width(MIXED, 5, feature=3),
     "critical_width.feature=3 must be an integer in 0..2"),
    (lambda: theory.delta_f_threshold(MIXED, 0), "rare_task=0 is in the frequent set"),
    (lambda: theory.delta_f(MIXED, np.ones(5)), r"shape \(5,\); .*TaskMixture.num_tasks=6"),
    (lambda: theory.frequent_gradient_bound(MIXED, -0.5), "delta=-0.5 must be ≥ 0"),
    (lambda: theory.corrected_alignment(0.5, 300, 256), "width: width 300 exceeds input_dim=256"),
    (lambda: theory.example7_decay(-1.0, 3), "example7_decay.eta=-1.0 must be ≥ 0"),
])
def test_bad_inputs_raise_config_error(call, message):
    with pytest.raises(ConfigError, match=message):
        call()

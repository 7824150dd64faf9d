"""The task mixture (docs/method.md §1) and its data stream: priors, spectra, batches, checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dataclasses

from rareret.errors import ConfigError
from rareret.synthetic import tasks
from rareret.synthetic.spec import Sweep
from rareret.synthetic.spec import TaskMixture, directions_for_energy

# K=4, d_T=3, D=20: coordinates 12..19 are distractors; α_k differ so spectra rows differ.
MIX = TaskMixture(num_tasks=4, task_dim=3, input_dim=20, beta=1.0, complexity_range=(1, 3))


def _eager_batch(mixture, data_seed, step, batch_size):
    """Step `step`'s (x, task ids, y) exactly as the trainer builds them."""
    key = tasks.batch_key(data_seed, step)
    x = tasks.sample_inputs(key, batch_size, mixture.input_dim)
    task = tasks.sample_tasks(key, batch_size, jnp.asarray(mixture.prior_array()))
    y = tasks.targets(x, task, jnp.sqrt(jnp.asarray(mixture.spectra(), jnp.float32)))
    return x, task, y


_jit_batch = jax.jit(_eager_batch, static_argnums=(0, 3))


def _batch(mixture, data_seed, step, batch_size=1024):
    return tuple(np.asarray(a) for a in _jit_batch(mixture, data_seed, step, batch_size))


def _counts(mixture):
    """Per task, the number of directions holding 90% of its energy."""
    return np.array([directions_for_energy(row) for row in mixture.spectra()])


# --- priors -------------------------------------------------------------------------------------

def test_power_law_priors():
    k = np.arange(1, 6)
    expected = k ** -1.5 / np.sum(k ** -1.5)
    pi = TaskMixture(num_tasks=5, task_dim=1, input_dim=5, beta=1.5).prior_array()
    np.testing.assert_allclose(pi, expected, rtol=1e-12)


def test_explicit_priors_are_normalised_and_override_beta():
    pi = TaskMixture(num_tasks=4, task_dim=1, input_dim=4, beta=3.0, priors=[2, 0, 1, 1])
    np.testing.assert_allclose(pi.prior_array(), [0.5, 0.0, 0.25, 0.25], rtol=1e-12)


def test_beta_zero_is_uniform():
    pi = TaskMixture(num_tasks=7, task_dim=1, input_dim=7, beta=0.0).prior_array()
    np.testing.assert_allclose(pi, np.full(7, 1 / 7), rtol=1e-12)


# --- spectra ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mixture", [
    TaskMixture(num_tasks=3, task_dim=8, input_dim=24, alpha=2.0),
    TaskMixture(num_tasks=3, task_dim=8, input_dim=24, alpha=0.5),
    TaskMixture(num_tasks=8, task_dim=16, input_dim=128, complexity_range=(2, 12)),
    MIX,
], ids=["alpha2", "alpha0.5", "complexity", "mix"])
def test_spectra_rows_descend_at_either_scale(mixture):
    first = dataclasses.replace(mixture, spectrum_norm="first").spectra()
    trace = dataclasses.replace(mixture, spectrum_norm="trace").spectra()
    assert mixture.spectrum_norm == "first"  # The default reproduces the paper's δ_F (theory).
    for lam in (first, trace):
        assert lam.shape == (mixture.num_tasks, mixture.task_dim)
        assert np.all(np.diff(lam, axis=1) < 0)
    np.testing.assert_array_equal(first[:, 0], 1.0)  # 'first': λ_k1 = 1 for every task.
    np.testing.assert_allclose(trace.sum(axis=1), 1.0, rtol=1e-12)  # 'trace': Tr C_k = 1.
    np.testing.assert_allclose(dataclasses.replace(mixture, spectrum_norm="trace").traces(), 1.0,
                               rtol=1e-12)
    # Same shape, other scale: λ_kj = j^(−α_k) under 'first'.
    np.testing.assert_allclose(first, trace / trace[:, :1], rtol=1e-12)
    np.testing.assert_allclose(mixture.traces(), first.sum(axis=1), rtol=1e-12)
    j = np.arange(1, mixture.task_dim + 1)
    np.testing.assert_allclose(first, j[None, :] ** -mixture.alphas()[:, None], rtol=1e-12)


def test_power_law_spectrum_shape():
    lam = TaskMixture(num_tasks=1, task_dim=32, input_dim=32, alpha=2.0).spectra()[0]
    j = np.arange(1, 33)
    np.testing.assert_allclose(lam[0] / lam, j ** 2.0, rtol=1e-12)


def test_alpha_2_needs_5_directions_for_90_percent_energy():
    lam = TaskMixture(num_tasks=1, task_dim=32, input_dim=32, alpha=2.0).spectra()[0]
    assert directions_for_energy(lam) == 5
    assert lam[:5].sum() >= 0.9 * lam.sum() > lam[:4].sum()


@pytest.mark.parametrize("lo, hi", [(4, 7), (2, 12)])
def test_complexity_range_runs_from_frequent_to_rare(lo, hi):
    counts = _counts(TaskMixture(num_tasks=32, task_dim=32, input_dim=1024, beta=2.0,
                                 complexity_range=(lo, hi)))
    assert counts[0] == lo and counts[-1] == hi
    assert np.all(np.diff(counts) >= 0)
    assert set(counts) == set(range(lo, hi + 1))  # Linear in rank: no count is skipped.


def test_complexity_follows_prior_rank_not_task_index():
    mixture = TaskMixture(num_tasks=4, task_dim=4, input_dim=16, priors=[0.1, 0.4, 0.2, 0.3],
                          complexity_range=(1, 4))
    np.testing.assert_array_equal(_counts(mixture), [4, 1, 3, 2])


def test_rank1_spectra_are_one():
    for kwargs in ({"alpha": 2.0}, {"complexity_range": (1, 1)}):
        mixture = TaskMixture(num_tasks=5, task_dim=1, input_dim=5, **kwargs)
        np.testing.assert_array_equal(mixture.spectra(), np.ones((5, 1)))


# --- batches ------------------------------------------------------------------------------------

def test_batch_is_a_pure_function_of_seed_and_step():
    x1, t1, y1 = _batch(MIX, 3, 17)
    x2, t2, y2 = _batch(MIX, 3, 17)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(t1, t2)
    np.testing.assert_array_equal(y1, y2)


def test_batch_under_jit_with_traced_seed_and_step_matches_eager():
    eager = _eager_batch(MIX, 3, 17, 1024)
    for a, b in zip(eager, _batch(MIX, 3, 17)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("seed, step", [(3, 18), (4, 17)])
def test_other_step_or_seed_gives_other_batch(seed, step):
    x1, t1, _ = _batch(MIX, 3, 17)
    x2, t2, _ = _batch(MIX, seed, step)
    assert not np.any(x1 == x2)
    assert not np.array_equal(t1, t2)


def test_batch_shapes_dtypes_and_sorted_tasks():
    x, task, y = _batch(MIX, 0, 5)
    assert x.shape == (1024, 20) and x.dtype == np.float32
    assert y.shape == (1024, 3) and y.dtype == np.float32
    assert task.shape == (1024,) and task.dtype == np.int32
    assert np.all(np.diff(task) >= 0)
    assert task.min() >= 0 and task.max() < MIX.num_tasks


@pytest.mark.parametrize("seed,step,shape", [(0, 0, (1024, 1024)), (7, 123456, (96, 20)),
                                             (2 ** 31 - 1, 2 ** 31 - 1, (1, 3))])
def test_inputs_are_jax_random_normal_bit_for_bit(seed, step, shape):
    """x is jax.random.normal's draw, every bit: only the hash's lowering is tasks.py's own."""
    key = tasks.batch_key(seed, step)
    expected = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32))
    jitted = jax.jit(tasks.sample_inputs, static_argnums=(1, 2))(key, *shape)
    for x in (jitted, tasks.sample_inputs(key, *shape)):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint32), expected.view(np.uint32))


def test_inputs_are_standard_normal():
    x, _, _ = _batch(MIX, 0, 0, batch_size=50_000)
    assert abs(x.mean()) < 4 / np.sqrt(x.size)
    np.testing.assert_allclose(x.var(axis=0), 1.0, atol=0.05)


def test_task_frequencies_match_priors():
    mixture = TaskMixture(num_tasks=8, task_dim=1, input_dim=8, beta=1.5)
    pi, n = mixture.prior_array(), 0
    counts = np.zeros(8)
    for step in range(4):
        _, task, _ = _batch(mixture, 1, step, batch_size=50_000)
        counts += np.bincount(task, minlength=8)
        n += task.size
    stderr = np.sqrt(pi * (1 - pi) / n)
    assert np.all(np.abs(counts / n - pi) < 4 * stderr), (counts / n, pi)


def test_zero_prior_tasks_are_never_drawn():
    # Zero priors first, inside and last: the inverse-CDF edges an injection stream relies on.
    mixture = TaskMixture(num_tasks=5, task_dim=1, input_dim=5, priors=(0, 2, 0, 1, 0))
    _, task, _ = _batch(mixture, 3, 0, batch_size=200_000)
    assert set(np.unique(task)) == {1, 3}
    assert np.all(np.diff(task) >= 0)


def test_targets_equal_scaled_own_block():
    x, task, y = _batch(MIX, 2, 9)
    assert set(task) == set(range(MIX.num_tasks))
    sqrt_lam = np.sqrt(MIX.spectra())
    T = MIX.task_dim
    expected = np.stack([sqrt_lam[k] * x[b, k * T:(k + 1) * T].astype(np.float64)
                         for b, k in enumerate(task)])
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)


def test_targets_ignore_distractors_and_other_blocks():
    x, task, y = _batch(MIX, 2, 9)
    noise = np.random.default_rng(0).normal(size=x.shape).astype(np.float32)
    keep = np.zeros_like(x, dtype=bool)
    for b, k in enumerate(task):
        keep[b, MIX.block(int(k))] = True
    assert not keep[:, MIX.num_tasks * MIX.task_dim:].any()
    x_other = np.where(keep, x, noise)  # Distractors and every other task's block replaced.
    sqrt_lam = jnp.sqrt(jnp.asarray(MIX.spectra(), jnp.float32))
    y_other = tasks.targets(jnp.asarray(x_other), jnp.asarray(task), sqrt_lam)
    np.testing.assert_array_equal(np.asarray(y_other), y)


# --- validation ---------------------------------------------------------------------------------

SMALL = {"num_tasks": 4, "task_dim": 4, "input_dim": 16}
BAD_MIXTURES = [
    ({"num_tasks": 0}, "num_tasks=0"),
    ({"task_dim": 0}, "task_dim=0"),
    ({"task_dim": 8}, "= 32 exceeds input_dim=16"),
    ({"beta": -1}, "beta=-1"),
    ({"beta": float("nan")}, "beta=nan"),
    ({"alpha": -1}, "alpha=-1"),
    ({"priors": [1, 1, 1]}, "priors has 3 entries"),
    ({"priors": [1, -1, 1, 1]}, "[1, -1, 1, 1]"),
    ({"complexity_range": (0, 3)}, "(0, 3)"),
    ({"complexity_range": (5, 2)}, "(5, 2)"),
    ({"num_tasks": 2, "complexity_range": (1, 99)}, "99"),
    ({"spectrum_norm": "sum"}, "spectrum_norm='sum' is not one of ['first', 'trace']"),
    ({"spectrum_norm": None}, "spectrum_norm=None is not one of ['first', 'trace']"),
]
BAD_SWEEPS = [
    ({"widths": []}, "widths=[]"),
    ({"widths": [0]}, "widths: 0"),
    ({"widths": [2, 2]}, "duplicate value(s) [2]"),
    ({"widths": [2.5]}, "2.5"),
    ({"seeds": [-1]}, "seeds: -1"),
    ({"learning_rate": 0}, "learning_rate=0"),
    ({"learning_rate": [1e-3, -1]}, "learning_rate=-1"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"num_steps": 0}, "num_steps=0"),
    ({"record_every": 0}, "record_every=0"),
    ({"warmup_steps": -1}, "warmup_steps=-1"),
]


def _check_message(error, text):
    message = str(error.value)
    assert text in message
    assert "\n" not in message


@pytest.mark.parametrize("kwargs, text", BAD_MIXTURES, ids=[t for _, t in BAD_MIXTURES])
def test_bad_mixture_is_rejected(kwargs, text):
    with pytest.raises(ConfigError) as error:
        TaskMixture(**{**SMALL, **kwargs})
    _check_message(error, text)


@pytest.mark.parametrize("kwargs, text", BAD_SWEEPS, ids=[t for _, t in BAD_SWEEPS])
def test_bad_sweep_is_rejected(kwargs, text):
    with pytest.raises(ConfigError) as error:
        Sweep(**kwargs)
    _check_message(error, text)


def test_width_above_input_dim_is_rejected():
    mixture = TaskMixture(num_tasks=16, task_dim=16, input_dim=256)
    Sweep(widths=[2, 256]).check_against(mixture)
    with pytest.raises(ConfigError) as error:
        Sweep(widths=[2, 300]).check_against(mixture)
    _check_message(error, "width 300 exceeds TaskMixture.input_dim=256")


WRONG_TYPES = [
    (Sweep, {"learning_rate": []}),
    (Sweep, {"num_steps": True}),
    (TaskMixture, {**SMALL, "num_tasks": True}),
    (TaskMixture, {**SMALL, "complexity_range": 5}),
    (TaskMixture, {**SMALL, "priors": [1, "a", 1, 1]}),
]


@pytest.mark.parametrize("cls, kwargs", WRONG_TYPES, ids=["lr=[]", "num_steps=True",
                                                          "num_tasks=True", "complexity_range=5",
                                                          "priors=str"])
def test_wrong_types_are_config_errors(cls, kwargs):
    with pytest.raises(ConfigError):
        cls(**kwargs)


def test_impossible_complexity_names_hi():
    with pytest.raises(ConfigError) as error:
        TaskMixture(**SMALL, complexity_range=(1, 99))
    _check_message(error, "99")

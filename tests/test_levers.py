"""Levers on rare-task learning: a per-model rare-task rate and interference-reducing update
rules (PCGrad, CAGrad), each checked against an independent computation (docs/method.md §5.1,
§5.2)."""

import math
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from rareret import store
from rareret.errors import ConfigError
from rareret.run import Run
from rareret.synthetic import aggregators, model, sweep, tasks
from rareret.synthetic.spec import Injection, Sweep, TaskMixture

MIX = TaskMixture(num_tasks=5, task_dim=1, input_dim=6, beta=1.0)
RARE = MIX.num_tasks - 1
MULTIPLIERS = (1, 2, 4.5)


def by_hand_priors(multiplier):
    """The rare task's prior × multiplier, the other priors scaled to a sum of 1."""
    prior = MIX.prior_array()
    out = prior * (1 - prior[RARE] * multiplier) / (1 - prior[RARE])
    out[RARE] = prior[RARE] * multiplier
    return out


# --- a per-model rare-task rate -----------------------------------------------------------------

def test_each_model_gets_exactly_its_rare_rate():
    """`rare_rate` is the fraction of rare examples actually drawn on each model's stream, equal to
    the count from the same keys and hand-made priors, and near multiplier × π_r."""
    spec = Sweep(widths=(1, 2), batch_size=128, num_steps=60, record_every=60, warmup_steps=1,
                 rare_multiplier=MULTIPLIERS)
    program = sweep.SweepProgram(MIX, spec)
    np.testing.assert_array_equal(program.model_coords["rare_multiplier"],
                                  np.repeat(MULTIPLIERS, 2))
    state = program.train(program.init(), 0, 40)
    state = program.train(state, 40, 60)  # The rate covers the last call's steps only.
    # Multiplier-1 models train bit for bit as in the sweep without the knob.
    plain = sweep.SweepProgram(MIX, Sweep(**{**vars(spec), "rare_multiplier": None}))
    plain_params = plain.train(plain.init(), 0, 60)["params"]
    for a, b in zip(jax.tree.leaves(sweep.unstacked(plain_params)),
                    jax.tree.leaves(sweep.unstacked(state["params"])[:2])):
        np.testing.assert_array_equal(a, b)
    draw = jax.jit(jax.vmap(lambda t, priors: tasks.sample_tasks(tasks.batch_key(0, t), 128,
                                                                 priors), in_axes=(0, None)))
    for m, multiplier in enumerate(program.model_coords["rare_multiplier"]):
        priors = jnp.asarray(by_hand_priors(float(multiplier)), jnp.float32)
        count = int(np.sum(draw(jnp.arange(40, 60), priors) == RARE))
        # The realised count, recovered from the recorded rate (float32 division: within 1e-7).
        assert round(float(state["rare_rate"][m]) * 128 * 20) == count, m
        assert abs(float(state["rare_rate"][m]) - count / (128 * 20)) < 1e-7
    # Statistically: 400 batches of 128 per stream.
    draws = jax.jit(jax.vmap(lambda t: program.batch(t)[2]))(jnp.arange(400))
    prior = MIX.prior_array()
    others = np.arange(RARE)
    for s, multiplier in enumerate(MULTIPLIERS):
        ids = np.asarray(draws[:, s]).ravel()
        rate = prior[RARE] * multiplier
        assert abs(np.mean(ids == RARE) - rate) < 4 * math.sqrt(rate * (1 - rate) / ids.size)
        kept = ids[ids != RARE]  # The other tasks keep their relative priors.
        expected = prior[others] / prior[others].sum()
        freq = np.bincount(kept, minlength=MIX.num_tasks)[others] / kept.size
        assert np.all(np.abs(freq - expected) < 4 * np.sqrt(expected / kept.size))


def test_multiplied_injection_counts_are_exact():
    """Under injection the multiplier scales the per-cycle counts: after c cycles exactly
    ⌊c · gap · B · rate · multiplier⌋ rare examples."""
    spec = Sweep(widths=(1,), batch_size=64, num_steps=40, record_every=40, warmup_steps=1,
                 rare_multiplier=(1, 2.5))
    program = sweep.SweepProgram(MIX, spec, Injection(gap=(2, 4), rate=0.05))
    assert [s[:2] for s in program.streams] == [(2, 1), (2, 2.5), (4, 1), (4, 2.5)]
    task = jax.device_get(jax.jit(jax.vmap(lambda t: program.batch(t)[2]))(jnp.arange(40)))
    for s, (gap, multiplier, _) in enumerate(program.streams):
        per_cycle = gap * 64 * Fraction("0.05") * Fraction(str(multiplier))
        cumulative = np.cumsum((task[:, s] == RARE).sum(axis=1))
        ends = np.arange(gap, 41, gap)
        np.testing.assert_array_equal(cumulative[ends - 1],
                                      [math.floor(c * per_cycle) for c in range(1, len(ends) + 1)])
    state = program.train(program.init(), 0, 40)
    realised = (task == RARE).sum(axis=(0, 2))
    np.testing.assert_array_equal(np.rint(np.asarray(state["rare_rate"]) * 64 * 40),
                                  realised[program.stream_M])


@pytest.mark.parametrize("kwargs, injection, text", [
    ({"rare_multiplier": 0}, None, "Sweep.rare_multiplier: 0 "),
    ({"rare_multiplier": (1, -2)}, None, "Sweep.rare_multiplier: -2 "),
    ({"rare_multiplier": ()}, None, "Sweep.rare_multiplier=[]"),
    ({"rare_multiplier": (2, 2)}, None, "Sweep.rare_multiplier=[2, 2] has duplicates"),
    ({"rare_multiplier": 12}, None, "Sweep.rare_multiplier=12 makes the rare task's prior"),
    ({"rare_multiplier": (1, 3)}, Injection(gap=8, rate=0.05), "Sweep.rare_multiplier=3 with "
                                                                "Injection.gap=8"),
    ({"update_rule": "sgd"}, None, "Sweep.update_rule='sgd' "),
    ({"update_rule": ("pcgrad", "pcgrad")}, None, "Sweep.update_rule=('pcgrad', 'pcgrad')"),
])
def test_bad_levers_are_rejected(kwargs, injection, text):
    with pytest.raises(ConfigError, match=re.escape(text)):
        sweep.SweepProgram(MIX, Sweep(widths=(1,), batch_size=32, num_steps=10, **kwargs),
                           injection)


# --- PCGrad and CAGrad against direct computations ----------------------------------------------

def direct_pcgrad(g_KxP, order):
    """Yu et al.'s Algorithm 1 on explicit vectors, float64: row i projected off each earlier
    conflicting original row in `order[i]`, the projected rows summed."""
    g_KxP = np.asarray(g_KxP, np.float64)
    total = np.zeros(g_KxP.shape[1])
    for i in range(len(g_KxP)):
        g = g_KxP[i].copy()
        for j in order[i]:
            dot = g @ g_KxP[j]
            if dot < 0:
                g -= dot / (g_KxP[j] @ g_KxP[j]) * g_KxP[j]
        total += g
    return total


def combine(transformation, g_KxP, updates=1):
    """The transformation's output on a two-leaf tree holding `g_KxP`, flattened, after
    `updates` − 1 earlier updates."""
    g_KxP = jnp.asarray(g_KxP, jnp.float32)
    tree = {"a": g_KxP[:, :2].reshape(-1, 2, 1), "b": g_KxP[:, 2:]}
    state = transformation.init(None)
    for _ in range(updates):
        out, state = transformation.update(tree, state)
    return np.concatenate([np.asarray(out["a"]).ravel(), np.asarray(out["b"])])


def order_at(seed, count, num_tasks):
    return np.asarray(aggregators.projection_order(
        jax.random.fold_in(jax.random.key(seed), count), num_tasks))


def test_pcgrad_projects_conflicts_by_hand():
    # g1·g2 = −1: g1 → g1 + g2/2 = (0.5, 0.5, 0), g2 → g2 + g1 = (0, 1, 0).
    out = combine(aggregators.pcgrad(), [[1, 0, 0], [-1, 1, 0]])
    np.testing.assert_allclose(out, [0.5, 1.5, 0], rtol=1e-6)
    # No conflict: the plain sum, whatever the order.
    rows = [[1, 2, 0], [0, 1, 3], [2, 0, 1]]
    np.testing.assert_allclose(combine(aggregators.pcgrad(), rows), np.sum(rows, 0), rtol=1e-6)


@pytest.mark.parametrize("num_tasks, seed", [(2, 0), (3, 1), (4, 2), (4, 3)])
def test_pcgrad_equals_algorithm_1(num_tasks, seed):
    rng = np.random.default_rng(seed)
    g_KxP = rng.normal(size=(num_tasks, 7)) * rng.uniform(0.05, 3, size=(num_tasks, 1))
    g_KxP[1] = -0.7 * g_KxP[0] + 0.3 * g_KxP[1]  # A strong conflict.
    for updates in (1, 2):  # The order is redrawn each update.
        order = order_at(seed, updates - 1, num_tasks)
        assert all(sorted(row) == sorted(set(range(num_tasks)) - {i})
                   for i, row in enumerate(order.tolist()))
        expected = direct_pcgrad(g_KxP, order)
        assert not np.allclose(expected, g_KxP.sum(0), rtol=1e-3)  # Something was projected.
        np.testing.assert_allclose(combine(aggregators.pcgrad(seed), g_KxP, updates), expected,
                                   rtol=1e-5, atol=1e-6)
    orders = {order_at(seed, t, num_tasks).tobytes() for t in range(20)}
    assert len(orders) > 1 or num_tasks == 2  # Random, yet a pure function of (seed, count).


def test_pcgrad_is_a_no_op_with_one_task_and_ignores_absent_tasks():
    g = np.random.default_rng(0).normal(size=(1, 6)).astype(np.float32)
    np.testing.assert_array_equal(combine(aggregators.pcgrad(), g), g[0])
    rows = np.array([[1, 0, 0, 2], [-1, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    np.testing.assert_allclose(combine(aggregators.pcgrad(), rows),
                               direct_pcgrad(rows[:2], [[1], [0]]), rtol=1e-6)


def direct_cagrad(g_KxP, c):
    """CAGrad as its reference code computes it (scipy SLSQP on the dual), float64."""
    g_KxP = np.asarray(g_KxP, np.float64)
    gram, g0 = g_KxP @ g_KxP.T, g_KxP.sum(0)
    radius = c * np.linalg.norm(g0)
    num = len(g_KxP)
    result = scipy.optimize.minimize(
        lambda w: w @ gram.sum(1) + radius * np.sqrt(w @ gram @ w + 1e-30), np.full(num, 1 / num),
        bounds=[(0, 1)] * num, constraints={"type": "eq", "fun": lambda w: w.sum() - 1},
        method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    g_w = result.x @ g_KxP
    return (g0 + radius * g_w / np.linalg.norm(g_w)) / (1 + c)


@pytest.mark.parametrize("num_tasks, seed", [(2, 0), (3, 1), (4, 2), (16, 3)])
def test_cagrad_equals_the_reference_dual_solution(num_tasks, seed):
    rng = np.random.default_rng(seed)
    # Rows as the batch gives them: per-task gradients scaled by very unequal task shares.
    shares = rng.dirichlet(np.full(num_tasks, 0.5))
    g_KxP = rng.normal(size=(num_tasks, 9)) * shares[:, None]
    g_KxP[1] = -0.8 * g_KxP[0] + 0.2 * g_KxP[1]
    expected = direct_cagrad(g_KxP, 0.5)
    assert not np.allclose(expected, g_KxP.sum(0), rtol=1e-2)
    got = combine(aggregators.cagrad(0.5), g_KxP)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-6 * np.abs(expected).max())
    # The worst task fares no worse than under the plain sum.
    assert np.min(g_KxP @ got) >= np.min(g_KxP @ g_KxP.sum(0)) - 1e-7


def test_cagrad_with_one_task_or_no_radius_is_the_plain_sum():
    rows = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
    np.testing.assert_allclose(combine(aggregators.cagrad(0.5), rows[:1]), rows[0], rtol=1e-6)
    np.testing.assert_allclose(combine(aggregators.cagrad(0.0), rows), rows.sum(0), rtol=1e-6)


# --- update rules inside the packed sweep -------------------------------------------------------

RULE_MIX = TaskMixture(num_tasks=4, task_dim=1, input_dim=6, beta=1.0)
RULE_SWEEP = Sweep(widths=(2, 3), batch_size=64, num_steps=30, record_every=10, warmup_steps=5,
                   learning_rate=1e-2, update_rule=("adamw", "pcgrad", "cagrad"))


def direct_first_step(program, m, rule):
    """Model m's first update from independent code: per-task encoder rows by autodiff of the
    per-example loss, the rule applied to explicit vectors, clipping and Adam's first step."""
    group, copy = divmod(m, program.layout.copies)
    params = sweep.unstacked(program.init()["params"])[group]
    enc, dec = (np.asarray(params[name][copy], np.float64) for name in ("encoder", "decoders"))
    x, y, task = jax.device_get(program.batch(0))
    stream = program.stream_M[m]
    y, task = y[stream], task[stream]
    batch, num_tasks = task.size, RULE_MIX.num_tasks

    def loss(e, d, k=None):
        per_example = model.example_losses(e, d, x, y, task)
        return jnp.sum(per_example if k is None else jnp.where(task == k, per_example, 0)) / batch

    e32, d32 = jnp.asarray(enc, jnp.float32), jnp.asarray(dec, jnp.float32)
    rows = np.stack([np.asarray(jax.grad(loss)(e32, d32, k), np.float64).ravel()
                     for k in range(num_tasks)])
    if rule == "pcgrad":
        combined = direct_pcgrad(rows, order_at(program.sweep.data_seed, 0, num_tasks))
    else:
        combined = direct_cagrad(rows, 0.5)
    grads = {"encoder": combined.reshape(enc.shape),
             "decoders": np.asarray(jax.grad(loss, argnums=1)(e32, d32), np.float64)}
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
    clipped = {k: g * min(1.0, 1.0 / norm) for k, g in grads.items()}
    rate = program.sweep.learning_rate / program.sweep.warmup_steps  # Step 0 of the warm-up.
    new = {k: p - rate * (clipped[k] / (np.abs(clipped[k]) + 1e-8) + 0.01 * p)
           for k, p in (("encoder", enc), ("decoders", dec))}
    return rows, clipped, new


@pytest.fixture(scope="module")
def first_step():
    """The rules sweep (widths 2, 3 under adamw, pcgrad, cagrad) and its state after one step."""
    program = sweep.SweepProgram(RULE_MIX, RULE_SWEEP)
    return program, program.train(program.init(), 0, 1)


def test_adamw_models_beside_rules_step_as_in_the_plain_sweep(first_step):
    """Their encoder gradient is one GEMM from the hidden gradient instead of autodiff's."""
    program, state = first_step
    plain = sweep.SweepProgram(RULE_MIX, Sweep(**{**vars(RULE_SWEEP), "update_rule": "adamw"}))
    plain_state = plain.train(plain.init(), 0, 1)
    np.testing.assert_allclose(state["train_loss"][:2], plain_state["train_loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(plain_state["params"]), jax.tree.leaves(state["params"][:2])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for g in range(2):  # Adam's first moment: 0.1 × the clipped gradient.
        np.testing.assert_allclose(
            optax.tree_utils.tree_get(state["opt_state"][g], "mu")["encoder"],
            optax.tree_utils.tree_get(plain_state["opt_state"][g], "mu")["encoder"],
            rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("rule", ["pcgrad", "cagrad"])
def test_first_step_under_a_rule_equals_a_direct_computation(first_step, rule):
    program, state = first_step
    rules = ["adamw", "pcgrad", "cagrad"]
    m = int(np.flatnonzero((program.model_coords["update_rule"] == rules.index(rule))
                           & (program.model_coords["width"] == 2))[0])
    rows, clipped, new = direct_first_step(program, m, rule)
    assert np.min(rows @ rows.T) < 0  # The tasks conflict, so the rule has work to do.
    group, copy = divmod(m, program.layout.copies)
    # Adam's first moment after one step is 0.1 × the clipped combined gradient.
    mu = jax.tree.map(lambda a: np.asarray(a[copy]),
                      optax.tree_utils.tree_get(
                          sweep.unstacked(state["opt_state"])[group], "mu"))
    for name in ("encoder", "decoders"):
        scale = np.abs(clipped[name]).max()
        np.testing.assert_allclose(mu[name] / 0.1, clipped[name], rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=name)
        got = np.asarray(sweep.unstacked(state["params"])[group][name][copy])
        # Adam's first step is ≈ ±rate per coordinate: compare where the gradient is not ~0.
        big = np.abs(clipped[name]) > 1e-3 * scale
        np.testing.assert_allclose(got[big], new[name][big], rtol=1e-5, atol=1e-7, err_msg=name)


def test_rules_and_rates_train_together_and_are_recorded(tmp_path):
    spec = Sweep(**{**vars(RULE_SWEEP), "rare_multiplier": (1, 4), "num_steps": 20,
                    "widths": (2,)})
    Run(sweep.SweepProgram(RULE_MIX, spec), str(tmp_path), show_progress=False).execute()
    metrics = store.open_metrics(str(tmp_path / "metrics"))
    rules = metrics.read("update_rule")
    assert rules.tolist() == [0, 1, 2] * 2
    assert metrics.read("rare_multiplier").tolist() == [1] * 3 + [4] * 3
    rate = metrics.read("rare_rate")
    assert rate.shape == (3, 6) and np.isnan(rate[0]).all() and np.isfinite(rate[1:]).all()
    # Streams differing only in the rule draw the same tasks; the multiplier draws more.
    np.testing.assert_array_equal(rate[:, :3], rate[:, :1].repeat(3, axis=1))
    assert np.all(rate[1:, 3] > rate[1:, 0])
    loss = metrics.read("train_loss")
    assert np.isfinite(loss[1:]).all() and np.all(loss[-1] < loss[1])

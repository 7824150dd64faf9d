"""Distributed alignment search for T_CMP (rareret/lm/das.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rareret.errors import ConfigError
from rareret.lm import das, inject, model

VOCAB = 512
D = 16
PAIRS = 2000
STEPS = 400


@pytest.fixture(scope="module")
def task():
    return inject.build_task(inject.TaskSpec("cmp", "cmp", every_n=1), VOCAB, (0,))


def value_table(task):
    table = np.zeros(VOCAB, np.int64)
    table[task.tokens] = task.values
    return table


def synthetic_network(task, seed, x_at_site=True, x_bypasses_site=False):
    """A fixed network on token rows (TOK1, TOK2) computing [val(TOK1) < val(TOK2)].

    Site: h = M·z [B, 16], M a random rotation, z = (x, y, 14 distractors) with x = val(TOK1)/10,
    y = val(TOK2)/10 and distractor j = sin(2a_j·x̃ + b_j·ỹ + c_j) of the standardised values
    (correlated with X, never read). So X lives along u = M e_0 and Y along v = M e_1.
    Rest: logits (20·(y − x − 0.05), 0) over (True, False), y = vᵀh and x = uᵀh, or, with
    `x_bypasses_site`, x read from the input tokens (the site's copy of X is unused).
    `x_at_site=False` zeroes X (and its share of the distractors) at the site.
    Returns (hidden_fn, rest_fn, u, v).
    """
    rng = np.random.default_rng(seed)
    m = jnp.asarray(np.linalg.qr(rng.standard_normal((D, D)))[0], jnp.float32)
    a, b = (jnp.asarray(rng.standard_normal(D - 2), jnp.float32) for _ in range(2))
    c = jnp.asarray(rng.uniform(0, 6, D - 2), jnp.float32)
    values = jnp.asarray(value_table(task))

    def operands(tokens):
        return values[tokens[:, 0]] / 10.0, values[tokens[:, 1]] / 10.0

    def hidden_fn(tokens):
        x, y = operands(tokens)
        x = x if x_at_site else jnp.zeros_like(x)
        distractors = jnp.sin(2 * a * ((x - 4.95) / 2.9)[:, None]
                              + b * ((y - 4.95) / 2.9)[:, None] + c)
        return jnp.concatenate([x[:, None], y[:, None], distractors], axis=1) @ m.T

    def rest_fn(tokens, h):
        x = operands(tokens)[0] if x_bypasses_site else h @ m[:, 0]
        true_logit = 20.0 * (h @ m[:, 1] - x - 0.05)
        return jnp.stack([true_logit, jnp.zeros_like(true_logit)], axis=1)

    return hidden_fn, rest_fn, np.asarray(m[:, 0]), np.asarray(m[:, 1])


def train_and_test(task, hidden_fn, rest_fn, variable, seed):
    train = das.counterfactual_pairs(task, "train", PAIRS, variable, seed)
    test = das.counterfactual_pairs(task, "test", PAIRS, variable, seed)
    result = das.fit(hidden_fn, rest_fn, train.base, train.source, train.label_index, k=1,
                     steps=STEPS, seed=seed)
    held_out = das.iia(hidden_fn, rest_fn, result.basis, test.base, test.source,
                       test.label_index)
    return result, held_out


@pytest.mark.parametrize("variable", ["X", "Y"])
def test_recovers_planted_variable(task, variable):
    hidden_fn, rest_fn, u, v = synthetic_network(task, seed=4)
    base = das.counterfactual_pairs(task, "test", PAIRS, variable, 0)
    # The network computes T_CMP; without an intervention it scores the base rate of 1/2.
    plain = das.iia(hidden_fn, rest_fn, np.zeros((D, 1)), base.base, base.source,
                    base.label_index)
    assert plain == pytest.approx(0.5)
    result, held_out = train_and_test(task, hidden_fn, rest_fn, variable, seed=4)
    assert result.basis.shape == (D, 1)
    np.testing.assert_allclose(result.basis.T @ result.basis, np.eye(1), atol=1e-5)
    assert held_out > 0.95, held_out
    direction = u if variable == "X" else v
    assert abs(float(result.basis[:, 0] @ direction)) > 0.9
    assert result.losses[-50:].mean() < 0.2 * result.losses[:10].mean()


@pytest.mark.parametrize("x_at_site", [False, True], ids=["absent", "dormant"])
def test_fails_when_output_bypasses_site(task, x_at_site):
    """The output reads X from the tokens, not from the site. "absent": h holds no X at all, so
    DAS sits at the base rate. "dormant": h still holds an unused copy of X along u; a subspace
    mixing u with Y's read-out direction v moves some X information into the read-out of Y (the
    interpretability illusion of Makelov et al. 2023), which caps IIA near 0.70, far below the
    > 0.95 of a network that computes through the site."""
    hidden_fn, rest_fn, _, _ = synthetic_network(task, seed=4, x_at_site=x_at_site,
                                                 x_bypasses_site=True)
    _, held_out = train_and_test(task, hidden_fn, rest_fn, "X", seed=4)
    assert held_out < (0.8 if x_at_site else 0.6), held_out


@pytest.mark.parametrize("variable", ["X", "Y"])
def test_counterfactual_pairs(task, variable):
    values = value_table(task)
    true_token, false_token = task.label_tokens
    train_rows = {tuple(r) for r in task.train[:, :2].tolist()}
    test_rows = {tuple(r) for r in task.test[:, :2].tolist()}
    train = das.counterfactual_pairs(task, "train", 1001, variable, seed=3)
    test = das.counterfactual_pairs(task, "test", 1000, variable, seed=3)
    for pairs, rows in ((train, train_rows), (test, test_rows)):
        first = values[np.where(variable == "X", pairs.source[:, 0], pairs.base[:, 0])]
        second = values[np.where(variable == "Y", pairs.source[:, 1], pairs.base[:, 1])]
        expected = np.where(first < second, true_token, false_token)
        np.testing.assert_array_equal(pairs.label, expected)
        np.testing.assert_array_equal(pairs.label_index, np.where(expected == true_token, 0, 1))
        base_expected = np.where(values[pairs.base[:, 0]] < values[pairs.base[:, 1]],
                                 true_token, false_token)
        np.testing.assert_array_equal(pairs.base_label, base_expected)
        assert pairs.differs.sum() == len(pairs.label) // 2
        assert 0.4 < (pairs.label_index == 0).mean() < 0.6  # both labels well represented
        used = {tuple(r) for r in np.concatenate([pairs.base, pairs.source]).tolist()}
        assert used <= rows
    assert not {tuple(r) for r in np.concatenate([train.base, train.source]).tolist()} & test_rows
    again = das.counterfactual_pairs(task, "train", 1001, variable, seed=3)
    np.testing.assert_array_equal(again.source, train.source)
    with pytest.raises(ConfigError, match="variable"):
        das.counterfactual_pairs(task, "train", 10, "Z")


def test_complete_rotation():
    basis = np.linalg.qr(np.random.default_rng(0).standard_normal((6, 2)))[0]
    rotation = das.complete_rotation(basis)
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(6), atol=1e-12)
    np.testing.assert_allclose(rotation[:, :2], basis)


@pytest.mark.parametrize("remat", [False, True])
def test_lm_site_fns(task, remat):
    config = model.OlmoConfig(d_model=16, n_layers=2, n_heads=2, vocab_size=VOCAB, remat=remat)
    rng = np.random.default_rng(0)  # Random weights without compiling `init_params`.
    params = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(0, 0.3, leaf.shape), jnp.float32),
                          model.param_shapes(config))
    rows = jnp.asarray(task.test[:8, :2])
    logits, hidden = jax.jit(model.apply_with_hidden, static_argnums=0)(config, params, rows)
    sites = ((1, 1),) if remat else ((0, 0), (1, 1), (2, 0), (2, 1))
    for layer, position in sites:
        hidden_fn, rest_fn = das.lm_site_fns(config, layer, position)

        @jax.jit
        def site(params, rows, noise):
            h = hidden_fn(params, rows)
            return h, rest_fn(params, rows, h), rest_fn(params, rows, h + noise)

        h, same, moved = site(params, rows, jax.random.normal(jax.random.key(layer), (8, 16)))
        np.testing.assert_allclose(h, hidden[layer][:, position], rtol=1e-5, atol=1e-6)
        # Putting back the site's own value changes nothing; moving it changes the logits at
        # position 1, except after the last block at position 0 (no block reads it there).
        np.testing.assert_allclose(same, logits[:, 1], rtol=1e-5, atol=1e-5)
        change = float(jnp.abs(moved - logits[:, 1]).max())
        read = (layer, position) != (2, 0)
        assert change > 1e-3 if read else change < 1e-5
        if (layer, position) == (1, 1) and not remat:  # (remat: `fit` below differentiates)
            grad = jax.jit(jax.grad(lambda h: rest_fn(params, rows, h).sum()))(h)
            assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0
    candidates = inject.label_candidates(task)
    hidden_fn, rest_fn = das.lm_site_fns(config, 1, 1, candidates=candidates)
    if not remat:
        # Swapping the whole position-1 stream makes the model read the source's TOK2 wherever
        # the site is; with TOK1 shared it then gives the source's logits exactly.
        source = rows.at[:, 1].set(jnp.asarray(task.test[8:16, 1]))
        swapped = das.interchange_logits(hidden_fn, rest_fn, np.eye(16), rows, source,
                                         state=params)
        expected = jax.jit(model.apply, static_argnums=0)(config, params, source)[:, 1]
        np.testing.assert_allclose(swapped, expected[:, candidates], rtol=1e-5, atol=1e-5)
    else:  # `fit` end to end on the LM site, params passed as state (wiring only).
        pairs = das.counterfactual_pairs(task, "train", 16, "X")
        result = das.fit(hidden_fn, rest_fn, pairs.base, pairs.source, pairs.label_index,
                         steps=3, batch=8, state=params)
        assert result.basis.shape == (16, 1) and np.all(np.isfinite(result.losses))


def test_fit_validation():
    tokens = np.zeros((4, 2), np.int32)
    hidden_fn = lambda t: jnp.ones((t.shape[0], 3))  # noqa: E731
    rest_fn = lambda t, h: h[:, :2]  # noqa: E731
    with pytest.raises(ConfigError, match="k=4"):
        das.fit(hidden_fn, rest_fn, tokens, tokens, np.zeros(4, np.int64), k=4)
    with pytest.raises(ConfigError, match="leading pair axis"):
        das.fit(hidden_fn, rest_fn, tokens, tokens[:3], np.zeros(4, np.int64))

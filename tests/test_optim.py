"""The synthetic sweep's optimiser step (`optim.Optimizer.step`): `paper_adamw` written out, and
its freeze of a model whose gradient is non-finite (docs/method.md §2, §3.5)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rareret.synthetic import aggregators, optim

PARAMS = {"encoder": jax.random.normal(jax.random.key(0), (6, 40)),
          "decoders": jax.random.normal(jax.random.key(1), (4, 3, 6))}


def gradient(step):
    """Per step, a gradient whose norm is below the clip (even steps) or far above (odd)."""
    scale = 10.0 if step % 2 else 1e-3
    return jax.tree.map(lambda p: scale * jax.random.normal(jax.random.fold_in(
        jax.random.key(2), step), p.shape), PARAMS)


@jax.jit
def optax_step(grads, state, params):
    updates, state = optim.paper_adamw(3e-2, 4).update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_step_is_paper_adamw():
    """Moments and counts exactly optax's, parameters up to float32 contraction (XLA fuses the
    update differently), over steps with the gradient clipped and not."""
    opt = optim.Optimizer(3e-2, 4, 0.01)
    step = jax.jit(opt.step)
    state = opt.init(PARAMS)
    assert jax.tree.structure(state) == jax.tree.structure(optim.paper_adamw(3e-2, 4).init(PARAMS))
    params = PARAMS
    for t in range(8):
        want_params, want_state = optax_step(gradient(t), state, params)
        params, state, frozen = step(gradient(t), state, params, False)
        assert not frozen
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        params = want_params


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e30])  # 1e30: its square overflows the norm.
@pytest.mark.parametrize("rule", ["adamw", "pcgrad"])
def test_a_non_finite_gradient_freezes_the_model(bad, rule):
    """One bad entry anywhere: params and the whole state (aggregator's too) come back as they
    were, flagged; a model frozen already stays so whatever its gradient."""
    aggregator = aggregators.pcgrad() if rule == "pcgrad" else None
    opt = optim.Optimizer(3e-2, 4, 0.01, aggregator)
    step = jax.jit(opt.step)

    def grads(t):  # Under an aggregator, the encoder's per-task contributions [K, ...].
        g = gradient(t)
        return {**g, "encoder": jnp.stack([g["encoder"], -0.5 * g["encoder"]])} if aggregator else g

    params, state, _ = step(grads(0), opt.init(PARAMS), PARAMS, False)
    poisoned = grads(1)
    poisoned["decoders"] = poisoned["decoders"].at[2, 1, 0].set(bad)
    cases = ((poisoned, False), (grads(1), True))  # (gradient, frozen before the step)
    for g, frozen_before in cases:
        new_params, new_state, frozen = step(g, state, params, frozen_before)
        assert frozen
        for got, want in zip(jax.tree.leaves((new_params, new_state)),
                             jax.tree.leaves((params, state))):
            np.testing.assert_array_equal(got, want)
    _, moved, frozen = step(grads(1), state, params, False)
    assert not frozen and jax.tree.leaves(moved)[0] != jax.tree.leaves(state)[0]  # Counts on.

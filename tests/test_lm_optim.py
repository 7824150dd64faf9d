"""The LM optimiser (rareret/lm/optim.py): the learning-rate schedule's documented values (first
update non-zero, peak after `warmup_steps` updates, min_lr_ratio · peak at the last update), a
first update that moves the parameters, and gradient clipping that changes the result."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rareret.lm import optim
from rareret.lm.spec import LmTrain

SPEC = LmTrain(num_steps=20, warmup_steps=5, learning_rate=3e-3, min_lr_ratio=0.1,
               weight_decay=0.1, clip_norm=1.0)


def rates(spec: LmTrain, counts) -> np.ndarray:
    """The schedule at each update count, as optax evaluates it inside a jitted update."""
    return np.asarray(jax.jit(jax.vmap(optim.schedule(spec)))(jnp.asarray(counts, jnp.int32)))


def tree(seed: int, norm: float | None = None) -> dict:
    """A small parameter-shaped tree of random values (global norm `norm` if given)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    out = {"w": jax.random.normal(k1, (3, 4)), "b": jax.random.normal(k2, (5,))}
    if norm is not None:
        out = jax.tree.map(lambda x: x * (norm / optax.tree.norm(out)), out)
    return out


def test_first_update_changes_the_parameters():
    """Update 0 is AdamW's first step: m̂ = g, v̂ = g², so the update is exactly
    -lr(0) · (sign(g) + weight_decay · p) — every parameter moves, by lr(0) = peak / W."""
    params, grads = tree(0), tree(1, norm=0.5)  # Under clip_norm: the clip does nothing here.
    tx = optim.optimizer(SPEC)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    moved = optax.apply_updates(params, updates)
    for name in params:
        assert np.all(np.asarray(moved[name]) != np.asarray(params[name])), name
    lr0 = SPEC.learning_rate / SPEC.warmup_steps
    expected = jax.tree.map(lambda g, p: -lr0 * (jnp.sign(g) + SPEC.weight_decay * p),
                            grads, params)
    jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-5, atol=1e-9),
                 updates, expected)


def test_first_rate_is_the_documented_nonzero_value():
    peak, warmup, steps = SPEC.learning_rate, SPEC.warmup_steps, SPEC.num_steps
    assert rates(SPEC, [0])[0] > 0
    np.testing.assert_allclose(rates(SPEC, [0])[0], peak / warmup, rtol=1e-6)
    # No warm-up: the first update takes the cosine one update in, just under the peak.
    no_warmup = dataclasses.replace(SPEC, warmup_steps=0)
    end = peak * SPEC.min_lr_ratio
    np.testing.assert_allclose(
        rates(no_warmup, [0])[0], end + (peak - end) * 0.5 * (1 + np.cos(np.pi / steps)),
        rtol=1e-6)
    assert 0 < rates(no_warmup, [0])[0] < peak


def test_warmup_is_linear_and_reaches_the_peak_after_warmup_steps_updates():
    peak, warmup = SPEC.learning_rate, SPEC.warmup_steps
    all_rates = rates(SPEC, range(SPEC.num_steps))
    np.testing.assert_allclose(all_rates[:warmup], peak * np.arange(1, warmup + 1) / warmup,
                               rtol=1e-6)
    np.testing.assert_allclose(all_rates[warmup - 1], peak, rtol=1e-6)  # The W-th update.
    assert all_rates.max() <= peak * (1 + 1e-6)
    assert np.all(np.diff(all_rates[:warmup]) > 0)  # Rising through the warm-up,
    assert np.all(np.diff(all_rates[warmup - 1:]) < 0)  # then falling to the end.


@pytest.mark.parametrize("warmup, steps, ratio", [(5, 20, 0.1), (0, 7, 0.25), (3, 4, 0.0),
                                                  (0, 1, 0.1)])
def test_last_update_uses_min_lr_ratio_times_peak(warmup, steps, ratio):
    spec = LmTrain(num_steps=steps, warmup_steps=warmup, learning_rate=1e-2, min_lr_ratio=ratio)
    end = spec.learning_rate * ratio
    last, beyond = rates(spec, [steps - 1, steps + 10])
    np.testing.assert_allclose(last, end, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(beyond, end, rtol=1e-6, atol=1e-12)  # Held after the end.


def test_schedule_is_optax_warmup_cosine_one_update_later():
    """The documented rule: update t takes optax's warmup_cosine_decay_schedule(0, peak, W, N,
    end) at t + 1 (optax's own schedule at t is the old, lr-0-first schedule)."""
    reference = optax.warmup_cosine_decay_schedule(
        0.0, SPEC.learning_rate, SPEC.warmup_steps, SPEC.num_steps,
        end_value=SPEC.learning_rate * SPEC.min_lr_ratio)
    counts = np.arange(SPEC.num_steps)
    np.testing.assert_allclose(rates(SPEC, counts), [reference(t + 1) for t in counts],
                               rtol=1e-5)


def test_clipping_binds():
    """After a first update with a unit-norm gradient, a second gradient of norm 100 gives the
    same update as that gradient scaled to norm 1 (clip_norm = 1); without the clip it does not.

    (On the first update alone Adam is nearly scale-invariant, m̂/√v̂ = sign(g), so a first-step
    comparison would pass without any clipping; the second update mixes the two gradients'
    scales in Adam's moments, so there the clip decides the result.)"""
    params, first, second = tree(0), tree(1, norm=1.0), tree(2, norm=1.0)

    def second_update(clip_norm: float, scale: float):
        tx = optim.optimizer(dataclasses.replace(SPEC, clip_norm=clip_norm))
        update = jax.jit(tx.update)
        updates, state = update(first, tx.init(params), params)
        moved = optax.apply_updates(params, updates)
        big = jax.tree.map(lambda g: scale * g, second)
        np.testing.assert_allclose(optax.tree.norm(big), scale, rtol=1e-6)
        return update(big, state, moved)[0]

    reference = second_update(clip_norm=1.0, scale=1.0)
    clipped = second_update(clip_norm=1.0, scale=100.0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9),
                 clipped, reference)
    unclipped = second_update(clip_norm=1e6, scale=100.0)
    difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                     zip(jax.tree.leaves(unclipped), jax.tree.leaves(reference)))
    largest = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(reference))
    assert difference > 0.1 * largest, (difference, largest)


def test_smallest_runs_build_and_step():
    for spec in (LmTrain(num_steps=1, warmup_steps=0), LmTrain(num_steps=4, warmup_steps=3)):
        params = tree(0)
        tx = optim.optimizer(spec)
        updates, _ = jax.jit(tx.update)(tree(1), tx.init(params), params)
        assert all(np.all(np.isfinite(u)) and np.any(u != 0) for u in jax.tree.leaves(updates))

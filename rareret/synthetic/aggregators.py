"""Interference-reducing update rules: per-task gradients in, one combined gradient out
(docs/method.md §5.2).

Each rule is an optax `GradientTransformation` whose `update` takes per-task gradients, every
leaf with a leading task axis [K, ...], and returns one combined gradient of the leaves' shape.

Convention: row k is task k's *contribution* to the gradient of the batch's mean loss (its
examples' share of the sum), so the rows sum to the ordinary gradient; a task absent from the
batch has a zero row. Both rules return a linear combination Σ_k a_k g_k of the rows, with the
coefficients a [K] computed from the rows' Gram matrix alone, so the work on the parameters is
one Gram and one weighted sum whatever the rule.

- `pcgrad` (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1): for each
  task i, for every other task j in a random order, if g_i·g_j < 0 then
  g_i ← g_i − (g_i·g_j / |g_j|²) g_j (g_j the original, unprojected row); the result is the sum
  of the projected rows. Projection is invariant to a positive scale of g_j and linear in g_i,
  so on the rows it equals the share-weighted sum of the projected per-task mean-loss gradients;
  without conflicts it is the ordinary gradient, and with one task a no-op. The order is a
  pure function of (seed, update count): row i visits the others in `projection_order`.
- `cagrad` (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning"): with
  g_0 = Σ_k g_k, w* = argmin over the simplex of g_wᵀ g_0 + c |g_0| |g_w| (g_w = Σ w_k g_k),
  d = (g_0 + c |g_0| g_w*/|g_w*|) / (1 + c): the direction within c|g_0| of g_0 that best
  improves the worst task, scaled as the reference code's `rescale=2` so one task is a no-op.
  The dual is solved by `CAGRAD_ITERATIONS` accelerated projected-gradient steps
  (`cagrad_weights`).

Shapes: see docs/method.md "Shape letters": K tasks, P flattened parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

HIGHEST = jax.lax.Precision.HIGHEST
CAGRAD_ITERATIONS = 200  # Dual steps; the tests find the result within ~1e-5 of SLSQP at K ≤ 16.


class AggregatorState(NamedTuple):
    count: jax.Array  # Updates done (int32): seeds PCGrad's random order.


def _flatten(task_grads) -> jax.Array:
    """A tree whose leaves lead with [K] → [K, P]."""
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1)
                            for leaf in jax.tree.leaves(task_grads)], axis=1)


def _combining(coefficients) -> optax.GradientTransformation:
    """The transformation Σ_k a_k g_k with a_K = coefficients(gram_KxK, count)."""

    def init(params):
        del params
        return AggregatorState(jnp.zeros([], jnp.int32))

    def update(task_grads, state, params=None):
        del params
        grads_KxP = _flatten(task_grads)
        gram_KxK = jnp.matmul(grads_KxP, grads_KxP.T, precision=HIGHEST)
        coef_K = coefficients(gram_KxK, state.count)
        combined = jax.tree.map(
            lambda g: jnp.tensordot(coef_K, g, axes=1, precision=HIGHEST), task_grads)
        return combined, AggregatorState(state.count + 1)

    return optax.GradientTransformation(init, update)


def projection_order(key: jax.Array, num_tasks: int) -> jax.Array:
    """[K, K − 1]: row i lists the tasks other than i in a uniformly random order."""
    scores_KxK = jax.random.uniform(key, (num_tasks, num_tasks))
    scores_KxK = jnp.where(jnp.eye(num_tasks, dtype=bool), jnp.inf, scores_KxK)  # i sorts last.
    return jnp.argsort(scores_KxK, axis=1)[:, :num_tasks - 1]


def pcgrad_coefficients(gram_KxK: jax.Array, order_KxK1: jax.Array) -> jax.Array:
    """a [K] with Σ_k a_k g_k = Σ_i PCGrad(g_i), from the rows' Gram and `projection_order`.

    Projected row i is Σ_k A_ik g_k; its inner product with g_j is (A G)_ij, so the whole
    projection runs on K × K numbers.
    """
    num_tasks = gram_KxK.shape[0]
    rows = jnp.arange(num_tasks)
    sq_K = jnp.diagonal(gram_KxK)

    def visit(A_KxK, j_K):
        dot_K = jnp.sum(A_KxK * gram_KxK[:, j_K].T, axis=1)  # (A G)[i, j_i]
        conflict_K = (dot_K < 0) & (sq_K[j_K] > 0)
        scale_K = jnp.where(conflict_K, dot_K / jnp.where(conflict_K, sq_K[j_K], 1.0), 0.0)
        return A_KxK.at[rows, j_K].add(-scale_K), None

    A_KxK, _ = jax.lax.scan(visit, jnp.eye(num_tasks, dtype=gram_KxK.dtype), order_KxK1.T)
    return jnp.sum(A_KxK, axis=0)


def pcgrad(seed: int = 0) -> optax.GradientTransformation:
    """PCGrad; update t projects in `projection_order(fold_in(key(seed), t), K)`."""

    def coefficients(gram_KxK, count):
        key = jax.random.fold_in(jax.random.key(seed), count)
        return pcgrad_coefficients(gram_KxK, projection_order(key, gram_KxK.shape[0]))

    return _combining(coefficients)


def _project_to_weighted_simplex(v_K: jax.Array, a_K: jax.Array) -> jax.Array:
    """The Euclidean projection of v onto {z ≥ 0, aᵀz = 1} (a > 0; sort-based): z = max(v − τa, 0)
    with τ set by the entries whose ratio v_k / a_k is largest."""
    order_K = jnp.argsort(-v_K / a_K)
    v_sorted_K, a_sorted_K = v_K[order_K], a_K[order_K]
    tau_K = (jnp.cumsum(a_sorted_K * v_sorted_K) - 1.0) / jnp.cumsum(a_sorted_K * a_sorted_K)
    active_K = v_sorted_K / a_sorted_K > tau_K  # The first j entries are positive.
    last = jnp.max(jnp.where(active_K, jnp.arange(v_K.shape[0]), 0))
    return jnp.maximum(v_K - tau_K[last] * a_K, 0.0)


def cagrad_weights(gram_KxK: jax.Array, c: float,
                   iterations: int = CAGRAD_ITERATIONS) -> jax.Array:
    """w* [K] = argmin over the simplex of wᵀ G 1 + c |g_0| sqrt(wᵀ G w).

    Solved in z_k = |g_k| w_k, where the rows are unit vectors (the tiny rows of rare tasks are
    then as easy to weight as frequent ones) and the simplex becomes {z ≥ 0, Σ z_k/|g_k| = 1},
    by accelerated projected gradient (FISTA) with gradient-based restarts; the step is the
    reciprocal of a local curvature bound, c |g_0| K / |g_w| (the norm's Hessian is at most
    c |g_0| Ĝ / |g_w|, Ĝ the rows' cosines). Zero rows get weight 0.
    """
    norm_K = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_KxK), 0.0))
    present_K = norm_K > 0
    inverse_K = jnp.where(present_K, 1.0 / jnp.where(present_K, norm_K, 1.0), 0.0)
    cosine_KxK = gram_KxK * inverse_K[:, None] * inverse_K[None, :]
    linear_K = jnp.sum(gram_KxK, axis=1) * inverse_K
    radius = c * jnp.sqrt(jnp.maximum(jnp.sum(gram_KxK), 0.0))
    bound = radius * jnp.sum(present_K)
    a_K = jnp.where(present_K, inverse_K, 1.0)

    def step(_, carry):
        z_K, y_K, t = carry
        gy_K = cosine_KxK @ y_K
        norm = jnp.sqrt(jnp.maximum(y_K @ gy_K, 0.0))
        grad_K = linear_K + jnp.where(norm > 0, radius / jnp.where(norm > 0, norm, 1.0), 0.0) * gy_K
        rate = jnp.where(bound > 0, norm / jnp.where(bound > 0, bound, 1.0), 0.0)
        moved_K = jnp.where(present_K, y_K - rate * grad_K, -1e30)  # Zero rows stay at 0.
        z_next = _project_to_weighted_simplex(moved_K, a_K)
        t = jnp.where(jnp.dot(y_K - z_next, z_next - z_K) > 0, 1.0, t)  # Restart.
        t_next = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
        return z_next, z_next + (t - 1.0) / t_next * (z_next - z_K), t_next

    start_K = norm_K / jnp.maximum(jnp.sum(present_K), 1)  # w uniform over the present rows.
    z_K, _, _ = jax.lax.fori_loop(0, iterations, step,
                                  (start_K, start_K, jnp.ones([], gram_KxK.dtype)))
    return z_K * inverse_K


def cagrad_coefficients(gram_KxK: jax.Array, c: float) -> jax.Array:
    """a [K] with Σ_k a_k g_k = (g_0 + c |g_0| g_w/|g_w|) / (1 + c), w = `cagrad_weights`."""
    w_K = cagrad_weights(gram_KxK, c)
    radius = c * jnp.sqrt(jnp.maximum(jnp.sum(gram_KxK), 0.0))
    norm = jnp.sqrt(jnp.maximum(w_K @ gram_KxK @ w_K, 0.0))
    scale = jnp.where(norm > 0, radius / jnp.where(norm > 0, norm, 1.0), 0.0)
    return (1.0 + scale * w_K) / (1.0 + c)


def cagrad(c: float = 0.5) -> optax.GradientTransformation:
    """CAGrad with conflict radius `c` (the paper's default 0.5); c = 0 is the plain sum."""
    return _combining(lambda gram_KxK, count: cagrad_coefficients(gram_KxK, c))



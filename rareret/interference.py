"""Per-task gradient interference: task × task Gram and cosine matrices of per-task gradients.

Generic over models: the caller supplies a function from parameter *groups* (a tuple or dict of
parameter sub-trees, e.g. the shared encoder, or each layer's MLP) to per-example losses [B]. The
forward pass is linearised once; the per-task backward passes run `task_chunk` tasks at a time
(vmapped cotangents under `lax.map`), so memory holds the chosen groups' gradients for every task,
never the gradients of all parameters (docs/method.md §3.6).

Shapes: see docs/method.md "Shape letters": B batch, K tasks, P flattened parameters of one
group; parameter groups have no letter ([groups, ...]).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Interference(NamedTuple):
    """Per parameter group: Gram [groups, K, K], cosine [groups, K, K] and norms [groups, K].

    Cosines involving a zero gradient (e.g. a task absent from the batch) are NaN.
    """

    gram: jax.Array
    cosine: jax.Array
    norm: jax.Array


def gram_stats(grads_KxP: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gram, cosine and norms of the rows of a [K, P] gradient matrix."""
    gram_KxK = jnp.matmul(grads_KxP, grads_KxP.T, precision=jax.lax.Precision.HIGHEST)
    norm_K = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_KxK), 0.0))
    denom_KxK = norm_K[:, None] * norm_K[None, :]
    cosine_KxK = jnp.where(denom_KxK > 0, gram_KxK / jnp.where(denom_KxK > 0, denom_KxK, 1.0),
                           jnp.nan)
    return gram_KxK, cosine_KxK, norm_K


def task_weights(task_B: jax.Array, num_tasks: int) -> jax.Array:
    """[K, B] weights turning per-example losses into each task's mean loss (0 if absent)."""
    onehot_KxB = jax.nn.one_hot(task_B, num_tasks, dtype=jnp.float32).T
    return onehot_KxB / jnp.maximum(onehot_KxB.sum(axis=1, keepdims=True), 1.0)


def task_gradients(example_losses: Callable, groups, task_B: jax.Array, num_tasks: int,
                   task_chunk: int = 8):
    """Gradients of each task's mean loss w.r.t. `groups`; every leaf gains a leading [K] axis."""
    _, vjp = jax.vjp(example_losses, groups)
    weights_KxB = task_weights(task_B, num_tasks)
    chunk = max(1, min(task_chunk, num_tasks))
    padded = -(-num_tasks // chunk) * chunk
    weights = jnp.pad(weights_KxB, ((0, padded - num_tasks), (0, 0)))
    # lax.map over chunks of tasks; each chunk's weights are [chunk, B].
    grads = jax.lax.map(lambda chunk_weights: jax.vmap(lambda w: vjp(w)[0])(chunk_weights),
                        weights.reshape(padded // chunk, chunk, -1))
    return jax.tree.map(lambda g: g.reshape((padded,) + g.shape[2:])[:num_tasks], grads)


def flatten_tasks(grads) -> jax.Array:
    """A pytree whose leaves lead with [K] → one [K, P] matrix."""
    leaves = jax.tree.leaves(grads)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def stats_per_group(grads_by_group) -> Interference:
    """Interference of each top-level entry of a tuple/list/dict of [K, ...] gradient trees."""
    entries = (list(grads_by_group.values()) if isinstance(grads_by_group, dict)
               else list(grads_by_group))
    stats = [gram_stats(flatten_tasks(g)) for g in entries]
    return Interference(*(jnp.stack(parts) for parts in zip(*stats)))


def interference(example_losses: Callable, groups, task_B: jax.Array, num_tasks: int,
                 task_chunk: int = 8) -> Interference:
    """Task × task interference of each parameter group, from one batch.

    Args:
      example_losses: maps `groups` to per-example losses [B] (close over everything else).
      groups: tuple/list/dict of parameter sub-trees; one matrix per top-level entry, in the
        order given.
      task_B: each example's task id.
      num_tasks: K.
      task_chunk: tasks whose backward passes run together (memory ∝ task_chunk).
    """
    if isinstance(groups, dict):  # jax rebuilds dicts in sorted-key order; keep the caller's.
        names = list(groups)
        grads = task_gradients(lambda values: example_losses(dict(zip(names, values))),
                               tuple(groups.values()), task_B, num_tasks, task_chunk)
    else:
        grads = task_gradients(example_losses, groups, task_B, num_tasks, task_chunk)
    return stats_per_group(grads)


def weighted_cosine(gram_KxK: jax.Array, a_K: jax.Array, b_K: jax.Array) -> jax.Array:
    """Cosine between Σ a_k g_k and Σ b_k g_k, from the Gram matrix of the g_k."""
    inner = a_K @ gram_KxK @ b_K
    return inner / jnp.sqrt((a_K @ gram_KxK @ a_K) * (b_K @ gram_KxK @ b_K))

"""Per-task gradient interference: task × task Gram and cosine matrices of per-task gradients.

Generic over models: the caller supplies a function from parameter *groups* (a tuple or dict of
parameter sub-trees, e.g. the shared encoder, or each layer's MLP) to per-example losses [B]. The
forward pass is linearised once; the per-task backward passes run `task_chunk` tasks at a time
(vmapped cotangents under `lax.map`), so memory holds the chosen groups' gradients for every task,
never the gradients of all parameters.

Shapes: B batch, T tasks, G parameter groups, P flattened parameters of one group.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Interference(NamedTuple):
    """Per parameter group: Gram [G, T, T], cosine [G, T, T] and gradient norms [G, T].

    Cosines involving a zero gradient (e.g. a task absent from the batch) are NaN.
    """

    gram: jax.Array
    cosine: jax.Array
    norm: jax.Array


def gram_stats(grads_TxP: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gram, cosine and norms of the rows of a [T, P] gradient matrix."""
    gram_TxT = jnp.matmul(grads_TxP, grads_TxP.T, precision=jax.lax.Precision.HIGHEST)
    norm_T = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_TxT), 0.0))
    denom_TxT = norm_T[:, None] * norm_T[None, :]
    cosine_TxT = jnp.where(denom_TxT > 0, gram_TxT / jnp.where(denom_TxT > 0, denom_TxT, 1.0),
                           jnp.nan)
    return gram_TxT, cosine_TxT, norm_T


def task_weights(task_B: jax.Array, num_tasks: int) -> jax.Array:
    """[T, B] weights turning per-example losses into each task's mean loss (0 if absent)."""
    onehot_TxB = jax.nn.one_hot(task_B, num_tasks, dtype=jnp.float32).T
    return onehot_TxB / jnp.maximum(onehot_TxB.sum(axis=1, keepdims=True), 1.0)


def task_gradients(example_losses: Callable, groups, task_B: jax.Array, num_tasks: int,
                   task_chunk: int = 8):
    """Gradients of each task's mean loss w.r.t. `groups`; every leaf gains a leading [T] axis."""
    _, vjp = jax.vjp(example_losses, groups)
    weights_TxB = task_weights(task_B, num_tasks)
    chunk = max(1, min(task_chunk, num_tasks))
    padded = -(-num_tasks // chunk) * chunk
    weights = jnp.pad(weights_TxB, ((0, padded - num_tasks), (0, 0)))
    grads = jax.lax.map(lambda w_CxB: jax.vmap(lambda w: vjp(w)[0])(w_CxB),
                        weights.reshape(padded // chunk, chunk, -1))
    return jax.tree.map(lambda g: g.reshape((padded,) + g.shape[2:])[:num_tasks], grads)


def flatten_tasks(grads) -> jax.Array:
    """A pytree whose leaves lead with [T] → one [T, P] matrix."""
    leaves = jax.tree.leaves(grads)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def stats_per_group(grads_by_group) -> Interference:
    """Interference of each top-level entry of a tuple/list/dict of [T, ...] gradient trees."""
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
      num_tasks: T.
      task_chunk: tasks whose backward passes run together (memory ∝ task_chunk).
    """
    if isinstance(groups, dict):  # jax rebuilds dicts in sorted-key order; keep the caller's.
        names = list(groups)
        grads = task_gradients(lambda values: example_losses(dict(zip(names, values))),
                               tuple(groups.values()), task_B, num_tasks, task_chunk)
    else:
        grads = task_gradients(example_losses, groups, task_B, num_tasks, task_chunk)
    return stats_per_group(grads)


def weighted_cosine(gram_TxT: jax.Array, a_T: jax.Array, b_T: jax.Array) -> jax.Array:
    """Cosine between Σ a_t g_t and Σ b_t g_t, from the Gram matrix of the g_t."""
    inner = a_T @ gram_TxT @ b_T
    return inner / jnp.sqrt((a_T @ gram_TxT @ a_T) * (b_T @ gram_TxT @ b_T))

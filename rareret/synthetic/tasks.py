"""The synthetic mixture's on-device data stream (its spec is `rareret.synthetic.spec`).

Task k reads x[k·d_T:(k+1)·d_T] and its target is y = Λ_k^{1/2} B_kᵀ x, i.e. that block scaled by
sqrt(λ_{k,j}) (docs/method.md §1). Every batch is a pure function of (data seed, step).

Shapes: see docs/method.md "Shape letters".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def batch_key(data_seed: int, step) -> jax.Array:
    """The key of step `step`'s batch: the data stream is a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.key(data_seed), step)


def sample_inputs(key: jax.Array, batch_size: int, input_dim: int) -> jax.Array:
    """x_BxD ~ N(0, I), float32."""
    return jax.random.normal(jax.random.fold_in(key, 0), (batch_size, input_dim), jnp.float32)


def sample_tasks(key: jax.Array, batch_size: int, priors_K: jax.Array) -> jax.Array:
    """task_B: i.i.d. draws from the prior, returned sorted.

    Examples are exchangeable and x is independent of the task, so sorting the ids leaves the
    batch's distribution unchanged; it lets the model process each task's rows as one block.
    """
    return stream_tasks(key, batch_size, priors_K, 0, 0)


def targets(x_BxD: jax.Array, task_B: jax.Array, sqrt_spectra_KxT: jax.Array) -> jax.Array:
    """y_BxT = Λ_k^{1/2} B_kᵀ x for each example's task k."""
    num_tasks, task_dim = sqrt_spectra_KxT.shape
    blocks_BxKxT = x_BxD[:, : num_tasks * task_dim].reshape(x_BxD.shape[0], num_tasks, task_dim)
    own_BxT = jnp.take_along_axis(blocks_BxKxT, task_B[:, None, None], axis=1)[:, 0]
    return own_BxT * sqrt_spectra_KxT[task_B]


def stream_tasks(key: jax.Array, batch_size: int, priors_K: jax.Array, rare_task,
                 rare_count) -> jax.Array:
    """task_B of one data stream: `rare_count` examples of `rare_task`, the rest from the prior
    (pass priors with 0 at the rare task for the renormalised prior). Sorted.

    Draws by inverse CDF (one uniform per example), not Gumbel-max (one per example and task).
    """
    draws = jax.random.choice(jax.random.fold_in(key, 1), priors_K.shape[0], (batch_size,),
                              p=priors_K)
    draws = jnp.where(jnp.arange(batch_size) < rare_count, rare_task, draws)
    return jnp.sort(draws).astype(jnp.int32)

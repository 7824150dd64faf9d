"""The synthetic mixture's on-device data stream (its spec is `rareret.synthetic.spec`).

Task k reads x[k·d_T:(k+1)·d_T] and its target is y = Λ_k^{1/2} B_kᵀ x, i.e. that block scaled by
sqrt(λ_{k,j}) (docs/method.md §1). Every batch is a pure function of (data seed, step).

Shapes: see docs/method.md "Shape letters".
"""

from __future__ import annotations

import math

import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np


def batch_key(data_seed: int, step) -> jax.Array:
    """The key of step `step`'s batch: the data stream is a pure function of (seed, step)."""
    return jax.random.fold_in(jax.random.key(data_seed), step)


def sample_inputs(key: jax.Array, batch_size: int, input_dim: int) -> jax.Array:
    """x_BxD ~ N(0, I), float32: exactly jax.random.normal(fold_in(key, 0), (B, D)).

    Only the random bits are drawn differently (`_unrolled_threefry_bits`), bit for bit the same.
    """
    key = jax.random.wrap_key_data(jax.random.key_data(jax.random.fold_in(key, 0)),
                                   impl=_UNROLLED_THREEFRY)
    return jax.random.normal(key, (batch_size, input_dim), jnp.float32)


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return jax.lax.shift_left(x, np.uint32(bits)) | jax.lax.shift_right_logical(
        x, np.uint32(32 - bits))


def _threefry2x32(key1, key2, x1, x2):
    """The Threefry-2x32 hash (20 rounds, Salmon et al. 2011), rounds unrolled."""
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (key1, key2, key1 ^ key2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x1 = x1 + x2
            x2 = x1 ^ _rotate_left(x2, r)
        x1, x2 = x1 + ks[(i + 1) % 3], x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _unrolled_threefry_bits(key: jax.Array, bit_width: int, shape) -> jax.Array:
    """jax's threefry random bits, the same bits: on CPU jax lowers the hash as a 5-step loop
    that copies its whole state every step; unrolled, XLA fuses it into the one elementwise pass
    that draws the normals. Cases other than jax's default (partitionable, 32-bit, fewer than
    2^32 draws) are left to jax."""
    size = math.prod(shape)
    if not (jax.config.jax_threefry_partitionable and bit_width == 32 and size < 2 ** 32):
        return _THREEFRY.random_bits(key, bit_width, shape)
    counts = jax.lax.iota(np.uint32, size).reshape(shape)  # The draws' index; high words 0.
    bits1, bits2 = _threefry2x32(key[0], key[1], jnp.zeros_like(counts), counts)
    return bits1 ^ bits2


_THREEFRY = jax.extend.random.threefry_prng_impl
_UNROLLED_THREEFRY = jax.extend.random.define_prng_impl(
    key_shape=_THREEFRY.key_shape, seed=_THREEFRY.seed, split=_THREEFRY.split,
    random_bits=_unrolled_threefry_bits, fold_in=_THREEFRY.fold_in,
    name="threefry2x32, unrolled", tag="fry_unrolled")


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


def stream_targets(x_BxD: jax.Array, task_SxB: jax.Array,
                   sqrt_spectra_KxT: jax.Array) -> jax.Array:
    """y_SxBxT: `targets` of every stream's task ids over the shared inputs."""
    return jax.vmap(lambda task_B: targets(x_BxD, task_B, sqrt_spectra_KxT))(task_SxB)


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

"""The language model's optimiser: global-norm gradient clipping, then AdamW (b1 0.9, b2 0.95,
eps 1e-8, decoupled weight decay) under a linear warm-up + cosine decay learning-rate schedule,
all from an `LmTrain` spec (peak `learning_rate`, `warmup_steps` W, `min_lr_ratio`,
`weight_decay`, `clip_norm`, `num_steps` N).

The schedule is indexed by optax's update count t: t = 0 for the first update, N − 1 for the
last. The rate of update t is the usual warm-up + cosine curve evaluated at t + 1, the number of
updates done once it is applied:

    lr(t) = peak · (t + 1) / W                                     for t < W
    lr(t) = end + (peak − end) · ½ · (1 + cos(π · (t + 1 − W) / (N − W)))   for W ≤ t,

with end = min_lr_ratio · peak, and lr(t) = end for t ≥ N − 1 (the cosine's progress is clipped
to 1). So:
  * the first update uses peak / W (or, with W = 0, the cosine's first value), never 0. optax's
    `warmup_cosine_decay_schedule(0, peak, W, N)` evaluated at t itself, as this module used to
    be, gives the first update a rate of 0: AdamW's first step then changes nothing (not even by
    weight decay) and one step of the run is wasted;
  * the W-th update (t = W − 1) is the first at the peak (W ≥ 1);
  * the last update (t = N − 1) uses exactly min_lr_ratio · peak (so with min_lr_ratio = 0 the
    last update is a no-op, by that spec's own definition).
`LmTrain` guarantees 0 ≤ W < N, so N − W ≥ 1.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from rareret.lm.spec import LmTrain

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.95, 1e-8


def schedule(spec: LmTrain) -> optax.Schedule:
    """The learning rate of update t (optax's count, 0 for the first update); see the module."""
    peak, warmup, steps = spec.learning_rate, spec.warmup_steps, spec.num_steps
    end = peak * spec.min_lr_ratio

    def rate(count):
        done = jnp.asarray(count, jnp.float32) + 1.0  # Updates done once this one is applied.
        warm = peak * done / max(warmup, 1)
        progress = jnp.clip((done - warmup) / (steps - warmup), 0.0, 1.0)
        cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(done <= warmup, warm, cosine)

    return rate


def optimizer(spec: LmTrain) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) → AdamW(`schedule(spec)`, weight_decay)."""
    return optax.chain(optax.clip_by_global_norm(spec.clip_norm),
                       optax.adamw(schedule(spec), b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS,
                                   weight_decay=spec.weight_decay))

"""The toy's optimiser (docs/method.md §2): AdamW with PyTorch defaults, an inverse-square-root
schedule and global-norm clipping at 1.0, built per model so clipping never couples models."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def inverse_sqrt_schedule(learning_rate, warmup_steps: int) -> optax.Schedule:
    """Linear warm-up to `learning_rate` over `warmup_steps`, then ∝ 1/sqrt(step)."""
    warmup = float(max(warmup_steps, 1))

    def schedule(count):
        t = count + 1.0
        return learning_rate * jnp.minimum(t / warmup, jnp.sqrt(warmup / t))

    return schedule


def paper_adamw(learning_rate, warmup_steps: int, weight_decay: float = 0.01,
                clip_norm: float = 1.0) -> optax.GradientTransformation:
    """clip_by_global_norm → AdamW(β=(0.9, 0.999), ε=1e-8, decoupled weight decay).

    optax.adamw multiplies the decay by the learning rate, exactly as torch.optim.AdamW does.
    `learning_rate` may be a traced scalar, so one compiled program serves per-model rates.
    """
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(inverse_sqrt_schedule(learning_rate, warmup_steps), b1=0.9, b2=0.999,
                    eps=1e-8, weight_decay=weight_decay),
    )


def aggregated(aggregator: optax.GradientTransformation, inner: optax.GradientTransformation,
               shared: str = "encoder") -> optax.GradientTransformation:
    """`inner` after `aggregator` has combined the per-task gradients of the `shared` entry.

    Updates are a dict whose `shared` entry holds per-task gradients (a leading [K] axis,
    `rareret.synthetic.aggregators`' convention); the other entries (task-specific parameters,
    whose per-task gradients never overlap) pass through as ordinary gradients. The state is
    (aggregator state, inner state).
    """

    def init(params):
        return aggregator.init(params[shared]), inner.init(params)

    def update(updates, state, params=None):
        combined, aggregator_state = aggregator.update(updates[shared], state[0])
        updates, inner_state = inner.update({**updates, shared: combined}, state[1], params)
        return updates, (aggregator_state, inner_state)

    return optax.GradientTransformation(init, update)

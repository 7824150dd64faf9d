"""The toy's optimiser (docs/method.md §2): AdamW with PyTorch defaults, an inverse-square-root
schedule and global-norm clipping at 1.0, built per model so clipping never couples models."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

B1, B2, EPS = 0.9, 0.999, 1e-8


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
        optax.adamw(inverse_sqrt_schedule(learning_rate, warmup_steps), b1=B1, b2=B2,
                    eps=EPS, weight_decay=weight_decay),
    )


class Optimizer(NamedTuple):
    """One model's `paper_adamw`, after `aggregator` (if any) has combined the per-task
    gradients of the `shared` entry, with a freeze (`step`).

    Gradients are a dict; under an aggregator its `shared` entry holds per-task gradients (a
    leading [K] axis, `rareret.synthetic.aggregators`' convention) and the other entries
    (task-specific parameters, whose per-task gradients never overlap) are ordinary gradients.
    The state is `paper_adamw`'s, or (aggregator state, `paper_adamw`'s).
    """

    learning_rate: jax.Array | float
    warmup_steps: int
    weight_decay: float
    aggregator: optax.GradientTransformation | None = None
    shared: str = "encoder"
    clip_norm: float = 1.0

    def init(self, params):
        state = paper_adamw(self.learning_rate, self.warmup_steps, self.weight_decay,
                            self.clip_norm).init(params)
        return state if self.aggregator is None else (self.aggregator.init(params[self.shared]),
                                                      state)

    def step(self, grads, state, params, frozen):
        """(params, state, frozen) after one step; a model `frozen` already, or whose gradient
        as AdamW takes it has a non-finite norm, keeps its params and state and is frozen.

        A finite state updated with a gradient of finite norm stays finite (clipping bounds the
        moments, ε the step) unless the step itself overflows float32, which takes a learning
        rate near 1e38. Deciding before the update, unlike testing the new parameters, lets XLA
        fuse the freeze into the update's elementwise pass.
        """
        adamw_state = state
        if self.aggregator is not None:
            combined, aggregator_state = self.aggregator.update(grads[self.shared], state[0])
            grads, adamw_state = {**grads, self.shared: combined}, state[1]
        norm = optax.tree.norm(grads)
        frozen = frozen | ~jnp.isfinite(norm)
        params, adamw_state = self._adamw(grads, norm, adamw_state, params, frozen)
        if self.aggregator is None:
            return params, adamw_state, frozen
        aggregator_state = jax.tree.map(lambda new, old: jnp.where(frozen, old, new),
                                        aggregator_state, state[0])
        return params, (aggregator_state, adamw_state), frozen

    def _adamw(self, grads, norm, state, params, frozen):
        """`paper_adamw`'s update and optax.apply_updates, the same float32 operations written
        out so that the new parameters read the (frozen or) new moments as written: XLA then
        updates parameters and moments in place, where optax's update, which reads the moments
        before the freeze, made XLA copy them every step."""
        clip_state, (adam, decay_state, schedule_state) = state
        kept = lambda new, old: jnp.where(frozen, old, new)
        clipped = jax.tree.map(lambda g: jax.lax.select(
            norm < self.clip_norm, g, (g / norm.astype(g.dtype)) * self.clip_norm), grads)
        count = optax.safe_increment(adam.count)
        mu = jax.tree.map(kept, optax.tree.update_moment(clipped, adam.mu, B1, 1), adam.mu)
        nu = jax.tree.map(kept, optax.tree.update_moment_per_elem_norm(clipped, adam.nu, B2, 2),
                          adam.nu)
        step_size = -inverse_sqrt_schedule(self.learning_rate, self.warmup_steps)(
            schedule_state.count)

        def update(p, m, v):
            m, v = m / (1 - B1 ** count), v / (1 - B2 ** count)  # Bias corrections.
            direction = m / (jnp.sqrt(v) + EPS) + self.weight_decay * p
            return jnp.where(frozen, p, p + jnp.asarray(step_size, p.dtype) * direction)

        adam = adam._replace(count=kept(count, adam.count), mu=mu, nu=nu)
        schedule_state = schedule_state._replace(
            count=kept(optax.safe_increment(schedule_state.count), schedule_state.count))
        return (jax.tree.map(update, params, mu, nu),
                (clip_state, (adam, decay_state, schedule_state)))

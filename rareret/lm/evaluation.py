"""Behavioural LM measurements on task instances (docs/method.md §6.8).

A task instance is the row TOK1 TOK2 LABEL EOS; the model predicts LABEL from the logits at
position `inject.LABEL_POS − 1`. Every function takes per-instance `weights_B` (0 or 1) and
returns weighted sums, so that instance sets of any size are evaluated in fixed-size batches
(padded with weight 0; nothing recompiles as the set of injected instances grows) and the
batches' sums add up:

- `label_sums`: (Σ w·cross-entropy of LABEL, Σ w·[argmax over the vocabulary = LABEL], Σ w).
- `label_loss_sum_without_mlp`: Σ w·cross-entropy with block `layer`'s MLP output set to zero
  (a null intervention localising the task: the paper's per-layer ablation).
- `mean`: a sum over its weight, NaN when nothing was weighted in.

Shapes (docs/method.md "Shape letters"): B instances, I instance length, V vocabulary.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rareret.lm import inject
from rareret.lm import model as lm_model
from rareret.lm.config import OlmoConfig


def _label_logits(config: OlmoConfig, params, tokens_BxI) -> jax.Array:
    """Logits of LABEL's position; only TOK1 TOK2 are fed (causal: the rest cannot change
    them)."""
    return lm_model.apply(config, params, tokens_BxI[:, :inject.LABEL_POS])[:,
                                                                           inject.LABEL_POS - 1]


def mean(total, weight):
    """total / weight, NaN where the weight is 0 (nothing to measure)."""
    return jnp.where(weight > 0, total / jnp.maximum(weight, 1), jnp.nan)


def label_sums(config: OlmoConfig, params, tokens_BxI, labels_B, weights_B):
    """(Σ w·cross-entropy of LABEL, Σ w·[argmax = LABEL], Σ w) over the instances."""
    logits_BxV = _label_logits(config, params, tokens_BxI)
    losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxV, labels_B)
    correct_B = (jnp.argmax(logits_BxV, axis=-1) == labels_B).astype(jnp.float32)
    return (jnp.sum(weights_B * losses_B), jnp.sum(weights_B * correct_B), jnp.sum(weights_B))


def _zero_mlp_of(layer):
    """A linen interceptor that replaces the output of block `layer`'s MLP by zeros (`layer` may
    be traced: one compiled program serves every block)."""
    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        parent = module.parent.name if module.parent is not None else None
        if (context.method_name == "__call__" and module.name == "mlp"
                and isinstance(parent, str) and parent.startswith("block_")):
            return jnp.where(layer == int(parent[len("block_"):]), jnp.zeros_like(out), out)
        return out
    return interceptor


def label_loss_sum_without_mlp(config: OlmoConfig, params, tokens_BxI, labels_B, weights_B,
                               layer: int) -> jax.Array:
    """Σ w·cross-entropy of LABEL with block `layer`'s MLP output zeroed."""
    with nn.intercept_methods(_zero_mlp_of(layer)):
        logits_BxV = _label_logits(config, params, tokens_BxI)
    return jnp.sum(weights_B * optax.softmax_cross_entropy_with_integer_labels(logits_BxV,
                                                                                labels_B))

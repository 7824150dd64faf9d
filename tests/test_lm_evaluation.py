"""Behavioural LM measurements (rareret/lm/evaluation.py) against independent computations:
weighted task metrics equal plain metrics on the weighted-in subset; zeroing a block's MLP by
interception equals zeroing its down-projection weights, and a block that does nothing gives no
change."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rareret.lm import evaluation, inject
from rareret.lm import model as lm_model
from rareret.lm.config import OlmoConfig

VOCAB = 64


@pytest.fixture(scope="module", params=["olmo", "olmo2"])
def setup(request):
    config = OlmoConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=VOCAB,
                        variant=request.param)
    params = lm_model.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens_BxI = jnp.asarray(rng.integers(1, VOCAB, (12, inject.INSTANCE_LEN)), jnp.int32)
    return config, params, tokens_BxI, tokens_BxI[:, inject.LABEL_POS]


def test_weights_select_instances(setup):
    config, params, tokens, labels = setup
    weights = jnp.asarray([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1], jnp.float32)
    loss_sum, correct, count = evaluation.label_sums(config, params, tokens, labels, weights)
    assert float(count) == 6
    loss, accuracy = evaluation.mean(loss_sum, count), evaluation.mean(correct, count)
    chosen = np.flatnonzero(np.asarray(weights))
    logits = lm_model.apply(config, params, tokens[chosen])[:, inject.LABEL_POS - 1]
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels[chosen]).mean()
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(accuracy, np.mean(np.argmax(logits, -1) == labels[chosen]))
    loss_sum, _, count = evaluation.label_sums(config, params, tokens, labels, jnp.zeros(12))
    assert np.isnan(evaluation.mean(loss_sum, count))  # Nothing injected yet: no measurement.


@pytest.mark.parametrize("layer", [0, 1])
def test_mlp_ablation_equals_zeroed_down_projection(setup, layer):
    config, params, tokens, labels = setup
    weights = jnp.ones(len(labels))
    ablated = evaluation.label_loss_sum_without_mlp(config, params, tokens, labels, weights,
                                                    layer)
    zeroed = jax.tree.map(lambda x: x, params)
    block = zeroed[f"block_{layer}"]["mlp"]
    block["down"] = jnp.zeros_like(block["down"])
    want = evaluation.label_sums(config, zeroed, tokens, labels, weights)[0]
    np.testing.assert_allclose(ablated, want, rtol=1e-6)
    base = evaluation.label_sums(config, params, tokens, labels, weights)[0]
    assert abs(float(ablated) - float(base)) > 1e-6  # Not a no-op on a random model.


def test_ablating_an_mlp_that_does_nothing_changes_nothing(setup):
    config, params, tokens, labels = setup
    silent = jax.tree.map(lambda x: x, params)
    silent["block_1"]["mlp"]["down"] = jnp.zeros_like(silent["block_1"]["mlp"]["down"])
    weights = jnp.ones(len(labels))
    base = evaluation.label_sums(config, silent, tokens, labels, weights)[0]
    ablated = evaluation.label_loss_sum_without_mlp(config, silent, tokens, labels, weights, 1)
    assert float(ablated) == float(base)



def test_accuracy_and_class_sums_come_from_one_pass(setup):
    """The probe records' fused pass (`measurements._label_class_sums`) gives the accuracy sums
    of `evaluation.label_sums` and, per class, the weighted sum of the residual at position 1."""
    from rareret.lm import measurements

    config, params, tokens, _ = setup
    logits = lm_model.apply(config, params, tokens[:, :inject.LABEL_POS])[:, inject.LABEL_POS - 1]
    tokens = np.asarray(tokens).copy()
    tokens[::2, inject.LABEL_POS] = np.argmax(logits, -1)[::2]  # Half the rows answered right.
    labels = jnp.asarray(tokens[:, inject.LABEL_POS])
    weights = jnp.asarray([1] * 11 + [0], jnp.float32)
    classes = np.random.default_rng(1).integers(0, measurements.NUM_CLASSES, len(tokens))
    correct, count, sums = measurements._label_class_sums(config, params, jnp.asarray(tokens),
                                                          jnp.asarray(classes), weights)
    _, want_correct, want_count = evaluation.label_sums(config, params, jnp.asarray(tokens),
                                                        labels, weights)
    assert float(correct) == float(want_correct) >= 5 and float(count) == float(want_count)
    hidden = np.stack(lm_model.apply_with_hidden(
        config, params, jnp.asarray(tokens[:, :inject.LABEL_POS]))[1])[:, :, 1]
    direct = np.zeros((hidden.shape[0], measurements.NUM_CLASSES, hidden.shape[2]))
    for b, c in enumerate(classes):
        direct[:, c] += float(weights[b]) * hidden[:, b]
    np.testing.assert_allclose(sums, direct, rtol=1e-5, atol=1e-6)

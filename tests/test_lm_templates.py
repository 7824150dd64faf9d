"""Natural-text reference templates (rareret/lm/templates.py): the weighted positions predict
exactly the answer's tokens, the recorded loss equals a direct cross-entropy of those tokens,
and token-file data (no tokenizer) is refused before any workdir is touched."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rareret.errors import ConfigError
from rareret.lm import data, measurements, templates
from rareret.lm import model as lm_model
from rareret.lm.config import OlmoConfig
from rareret.lm.spec import LmTrain
from rareret.lm.train import LmProgram

TOKENIZER = pathlib.Path(__file__).resolve().parent / "data" / "lm_tokenizer.json"


@pytest.fixture(scope="module")
def batches():
    return templates.template_batches(data.load_tokenizer(TOKENIZER))


def test_instances_follow_the_templates():
    texts = templates.template_texts()
    for prompt, answer in texts["R_cmp"]:
        assert prompt.startswith("it has increased from ") and prompt.endswith(" to")
        assert int(answer) > int(prompt.split()[-2])
    for prompt, answer in texts["R_add"]:
        x, plus, y, equals = prompt.split()
        assert (plus, equals) == ("+", "=") and int(answer) == int(x) + int(y)


def test_weights_mark_exactly_the_answer_tokens(batches):
    tokenizer = data.load_tokenizer(TOKENIZER)
    for name, texts in templates.template_texts().items():
        tokens, weights = batches[name]
        assert tokens.shape[0] == len(texts) == templates.NUM_INSTANCES == weights.shape[0]
        assert weights.shape[1] == tokens.shape[1] - 1
        for b, (prompt, answer) in enumerate(texts):
            answer_tokens = tokens[b, 1:][weights[b] > 0]
            assert tokenizer.decode(answer_tokens.tolist()).strip() == answer.strip(), name


def test_answer_loss_equals_direct_cross_entropy(batches):
    config = OlmoConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=512)
    params = lm_model.init_params(config, jax.random.key(0))
    tokens, weights = batches["R_add"]
    got = measurements._answer_loss(config, params, jnp.asarray(tokens), jnp.asarray(weights))
    total, count = 0.0, 0
    for row, w in zip(tokens[:50], weights[:50]):
        logits = lm_model.apply(config, params, jnp.asarray(row[None]))[0]
        for p in np.flatnonzero(w):
            total += float(optax.softmax_cross_entropy_with_integer_labels(logits[p], row[p + 1]))
            count += 1
    part = measurements._answer_loss(config, params, jnp.asarray(tokens[:50]),
                                     jnp.asarray(weights[:50]))
    np.testing.assert_allclose(part, total / count, rtol=1e-5)
    assert np.isfinite(got)


def test_token_data_without_tokenizer_is_refused(tmp_path):
    np.save(tmp_path / "tokens.npy", np.arange(4096, dtype=np.uint16) % 500)
    with pytest.raises(ConfigError, match="reference_templates=True needs text data"):
        LmProgram(LmTrain(data=str(tmp_path / "tokens.npy"), vocab_size=512, eos_id=0,
                          seq_len=32, global_batch=4, reference_templates=True))

"""Our OLMo ≡ the reference OLMo: HF transformers on the same weights gives the same logits, and
the same training loss and gradients (an independent check of the train step's numbers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rareret.errors import ConfigError  # noqa: E402
from rareret.lm import hf_interop, model  # noqa: E402
from rareret.lm.model import next_token_loss  # noqa: E402

VARIANTS = ("olmo", "olmo2")
VOCAB = 128


def tiny(variant, **overrides):
    return model.OlmoConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=VOCAB, variant=variant,
                            max_seq_len=64, rope_theta=500.0, **overrides)


def random_params(config, seed=0):
    """Every leaf random (norm scales around 1), large enough that logits are O(1-10)."""
    shapes, treedef = jax.tree_util.tree_flatten_with_path(model.param_shapes(config))
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    leaves = []
    for (path, shape), key in zip(shapes, keys):
        noise = jax.random.normal(key, shape.shape)
        leaves.append(1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else 0.3 * noise)
    return jax.tree.unflatten(treedef, leaves)


def hf_outputs(hf_model, tokens_BxL):
    with torch.no_grad():
        input_ids = torch.tensor(np.asarray(tokens_BxL), dtype=torch.long)
        return hf_model(input_ids, output_hidden_states=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant):
    config = tiny(variant)
    params = random_params(config)
    tokens_BxL = jax.random.randint(jax.random.key(1), (3, 24), 0, VOCAB)
    logits, hidden = jax.jit(model.apply_with_hidden, static_argnums=0)(config, params, tokens_BxL)
    hf_model = hf_interop.to_hf_model(config, params)
    expected = {"olmo": transformers.OlmoForCausalLM, "olmo2": transformers.Olmo2ForCausalLM}
    assert type(hf_model) is expected[variant]
    assert hf_model.config.tie_word_embeddings is False
    out = hf_outputs(hf_model, tokens_BxL)
    assert np.abs(np.asarray(logits)).max() > 1.0
    np.testing.assert_allclose(out.logits.numpy(), logits, rtol=0, atol=1e-4)
    # HF's last hidden state is after the final norm; ours is the residual stream before it.
    for ours, theirs in zip(hidden[:-1], out.hidden_states[:-1]):
        np.testing.assert_allclose(theirs.numpy(), ours, rtol=0, atol=1e-4)


# Float32 on both sides. Measured for this test on CPU (jax 0.10.2, torch 2.13, transformers
# 5.24): loss |Δ| = 1.4e-6 (loss ≈ 6.0), gradients max|Δ| ≤ 2.7e-6 · max|gradient| of the leaf.
LOSS_ATOL = 1e-5
GRAD_RTOL_OF_LEAF_MAX = 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_loss_and_gradients_match_transformers(variant):
    """One train step's loss and gradients: ours (jax.value_and_grad of the train step's
    `next_token_loss`) ≡ HF's (torch autograd of `model(input_ids, labels=input_ids).loss`, the
    mean next-token cross-entropy), HF's gradients mapped to our tree by `from_hf_state`."""
    config = tiny(variant)
    params = random_params(config, seed=2)
    tokens_BxL = jax.random.randint(jax.random.key(3), (4, 24), 0, VOCAB)
    with jax.default_matmul_precision("float32"):  # No TF32 / bf16 passes on accelerators.
        loss, grads = jax.jit(jax.value_and_grad(next_token_loss, argnums=1),
                              static_argnums=0)(config, params, tokens_BxL)
    hf_model = hf_interop.to_hf_model(config, params)
    input_ids = torch.tensor(np.asarray(tokens_BxL), dtype=torch.long)
    hf_loss = hf_model(input_ids, labels=input_ids).loss
    hf_loss.backward()
    hf_grads = {name: p.grad.numpy() for name, p in hf_model.named_parameters()}
    assert set(hf_grads) == set(hf_interop.to_hf(config, params)[1])  # All get a gradient.
    hf_grads = hf_interop.from_hf_state(config, hf_grads)

    assert abs(float(loss) - hf_loss.item()) <= LOSS_ATOL, (float(loss), hf_loss.item())
    assert 1.0 < float(loss) < 20.0
    assert jax.tree.structure(hf_grads) == jax.tree.structure(grads)
    for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(grads),
                                    jax.tree.leaves(hf_grads)):
        name = jax.tree_util.keystr(path)
        scale = float(np.abs(theirs).max())
        assert scale > 1e-3, f"{name}: gradient too small to compare ({scale})"
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=GRAD_RTOL_OF_LEAF_MAX * scale,
                                   err_msg=f"{variant} gradient {name}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_exact(variant):
    config = tiny(variant)
    params = random_params(config)
    hf_config, state = hf_interop.to_hf(config, params)
    assert hf_config.model_type == variant
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in state.values())
    config_back, params_back = hf_interop.from_hf(hf_interop.to_hf_model(config, params))
    assert config_back == config
    assert jax.tree.structure(params_back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, params_back, params)


def test_save_and_load_directory(tmp_path):
    config = tiny("olmo2")
    params = random_params(config)
    hf_interop.save_hf(config, params, tmp_path / "ckpt")
    config_back, params_back = hf_interop.from_hf(tmp_path / "ckpt")
    assert config_back == config
    jax.tree.map(np.testing.assert_array_equal, params_back, params)


def test_bfloat16_params_export():
    config = tiny("olmo", param_dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_params(config))
    _, state = hf_interop.to_hf(config, params)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    _, params_back = hf_interop.from_hf(hf_interop.to_hf_model(config, params), "bfloat16")
    jax.tree.map(np.testing.assert_array_equal, params_back, params)


def test_unsupported_exports_and_imports():
    with pytest.raises(ConfigError, match="layer_norm_eps"):
        hf_interop.to_hf(tiny("olmo", layer_norm_eps=1e-6), random_params(tiny("olmo")))
    hf_config = transformers.OlmoConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=None, eos_token_id=None)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        hf_interop.from_hf(transformers.OlmoForCausalLM(hf_config))

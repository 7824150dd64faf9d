"""The OLMo-style decoder: causality, parameter counts, logical axes, numerics, validation."""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rareret.errors import ConfigError
from rareret.lm import config as lm_config
from rareret.lm import ladder, model

VARIANTS = ("olmo", "olmo2")
apply = jax.jit(model.apply, static_argnums=0)


def tiny(variant, vocab_size=97, **overrides):
    return ladder.config_for("tiny", vocab_size=vocab_size, variant=variant, max_seq_len=32,
                             **overrides)


@pytest.fixture(scope="module", params=VARIANTS)
def tiny_model(request):
    """(config, params) of the tiny rung, one per variant."""
    config = tiny(request.param)
    return config, model.init_params(config, jax.random.key(0))


def tokens(seed=1, shape=(2, 12), vocab=97):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def test_causal(tiny_model):
    config, params = tiny_model
    tokens_BxL = tokens()
    logits = apply(config, params, tokens_BxL)
    for t in (0, 5, 10):
        changed = tokens_BxL.at[:, t + 1:].set((tokens_BxL[:, t + 1:] + 7) % 97)
        other = apply(config, params, changed)
        np.testing.assert_allclose(other[:, :t + 1], logits[:, :t + 1], atol=1e-6)
        assert np.abs(other[:, t + 1:] - logits[:, t + 1:]).max() > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rung", list(ladder.LADDER))
def test_param_count_formula_matches_tree(rung, variant):
    config = ladder.config_for(rung, variant=variant)
    counts = lm_config.param_count(config)
    assert counts["total"] == model.count_params(model.param_shapes(config))
    embedding = 2 * config.vocab_size * config.d_model
    assert counts["non_embedding"] == counts["total"] - embedding
    assert counts["olmo_non_embedding"] == counts["total"] - embedding // 2


def test_paper_rungs_by_hand():
    """OLMo (non-parametric norms): 2·V·D embeddings + n_layers · 16·D²."""
    for rung in ("4M", "20M", "300M", "1B", "4B"):
        config = ladder.config_for(rung)
        d = config.d_model
        assert lm_config.param_count(config)["total"] == 2 * 50304 * d + config.n_layers * 16 * d * d
    assert lm_config.param_count(ladder.config_for("1B"))["olmo_non_embedding"] == 1_176_764_416


@pytest.mark.parametrize("variant", VARIANTS)
def test_logical_partition_specs(variant):
    config = tiny(variant)
    specs = model.logical_partition_specs(config)
    shapes = model.param_shapes(config)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    assert jax.tree.structure(specs, is_leaf=is_spec) == jax.tree.structure(shapes)
    for spec, shape in zip(jax.tree.leaves(specs, is_leaf=is_spec), jax.tree.leaves(shapes)):
        assert len(spec) == len(shape.shape)
        assert set(spec) <= set(model.LOGICAL_AXES) | {None}
    assert specs["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert specs["head"] == jax.sharding.PartitionSpec("embed", "vocab")


@pytest.mark.parametrize("tiny_model", ["olmo2"], indirect=True)
def test_runs_under_mesh_and_rules(tiny_model):
    """With a mesh and logical-axis rules active, constraints apply and the logits are unchanged."""
    config, params = tiny_model
    tokens_BxL = tokens()
    expected = apply(config, params, tokens_BxL)
    mesh = jax.make_mesh((1, 1), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("batch", "data"), ("heads", "model"), ("mlp", "model"), ("vocab", "model"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = nn.logical_to_mesh_sharding(model.logical_partition_specs(config), mesh, rules)
        sharded = jax.device_put(params, shardings)
        logits = apply(config, sharded, tokens_BxL)
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_bfloat16_compute(tiny_model):
    config, params = tiny_model
    config_bf16 = dataclasses.replace(config, compute_dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(model.param_shapes(config_bf16)))
    logits = apply(config, params, tokens())
    logits_bf16 = apply(config_bf16, params, tokens())
    assert logits_bf16.dtype == jnp.float32
    assert np.abs(logits_bf16 - logits).max() < 0.05 * np.abs(logits).max()


@pytest.mark.parametrize("tiny_model", ["olmo2"], indirect=True)
def test_remat_changes_nothing(tiny_model):
    config, params = tiny_model
    tokens_BxL = tokens()

    def loss_and_grads(config):
        loss = lambda p: jnp.mean(jax.nn.log_softmax(apply(config, p, tokens_BxL))[..., 0])
        return jax.value_and_grad(loss)(params)

    plain, remat = loss_and_grads(config), loss_and_grads(dataclasses.replace(config, remat=True))
    # float32 rounding only: XLA may fuse the recomputed forward differently.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain, remat)


def test_hidden_states(tiny_model):
    config, params = tiny_model
    tokens_BxL = tokens()
    logits, hidden = jax.jit(model.apply_with_hidden, static_argnums=0)(config, params, tokens_BxL)
    assert len(hidden) == config.n_layers + 1
    assert all(h.shape == (2, 12, config.d_model) for h in hidden)
    np.testing.assert_array_equal(hidden[0], params["embedding"][tokens_BxL])
    np.testing.assert_allclose(logits, apply(config, params, tokens_BxL), atol=1e-6)


@pytest.mark.parametrize("fields, match", [
    (dict(d_model=30, n_layers=2, n_heads=4), "divisible"),
    (dict(d_model=32, n_layers=2, n_heads=4, variant="gpt2"), "variant"),
    (dict(d_model=32, n_layers=0, n_heads=4), "n_layers"),
    (dict(d_model=32, n_layers=2, n_heads=4, compute_dtype="float16"), "compute_dtype"),
    (dict(d_model=32, n_layers=2, n_heads=4, mlp_ratio=3), "mlp_ratio"),
    (dict(d_model=12, n_layers=2, n_heads=4), "even"),
])
def test_config_validation(fields, match):
    with pytest.raises(ConfigError, match=match):
        model.OlmoConfig(**fields)


def test_bad_ladder_and_tokens():
    with pytest.raises(ConfigError, match="unknown"):
        ladder.config_for("7B")
    with pytest.raises(ConfigError, match="override"):
        ladder.config_for("tiny", d_model=64)
    config = tiny("olmo")
    with pytest.raises(ConfigError, match="max_seq_len"):
        apply(config, model.param_shapes(config), tokens(shape=(1, 33)))


def test_format_ladder():
    table = ladder.format_ladder()
    assert "4B" in table and "4,707,057,664" in table


def sharded_matches_unsharded():
    """Run in a process with 8 CPU devices: loss and grads on a 2×4 mesh ≡ unsharded."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("batch", "data"), ("heads", "model"), ("mlp", "model"), ("vocab", "model"))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    for variant in VARIANTS:
        config = tiny(variant, vocab_size=128, remat=True)  # Vocab divisible by the mesh.
        tokens_BxL = tokens(shape=(4, 16))
        loss = lambda p, t: jnp.mean(jax.nn.logsumexp(model.apply(config, p, t), -1))
        params = model.init_params(config, jax.random.key(0))
        expected = jax.jit(jax.value_and_grad(loss))(params, tokens_BxL)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            shardings = nn.logical_to_mesh_sharding(
                model.logical_partition_specs(config), mesh, rules)
            init = jax.jit(model.init_params, static_argnums=0, out_shardings=shardings)
            sharded = init(config, jax.random.key(0))
            up_gate = sharded["block_0"]["mlp"]["up_gate"]
            assert up_gate.sharding.spec == jax.sharding.PartitionSpec(None, None, "model")
            got = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, data))(
                sharded, jax.device_put(tokens_BxL, data))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, expected)


@pytest.mark.slow
def test_sharded_matches_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    subprocess.run([sys.executable, __file__], env=env, check=True, timeout=300)


if __name__ == "__main__":
    sharded_matches_unsharded()

"""The packed model is the paper's model: checked against independent single-model code."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from rareret.synthetic import model, sweep, tasks
from rareret.synthetic.spec import Sweep, TaskMixture

MIXTURE = TaskMixture(num_tasks=6, task_dim=4, input_dim=32, beta=1.0, alpha=1.5)
SWEEP = Sweep(widths=(2, 5, 12, 24), seeds=(0, 3), learning_rate=(1e-3, 4e-3),
                    batch_size=96, num_steps=40, record_every=40, warmup_steps=10, tile_size=8)


def reference_run(params, mixture, sweep_spec, learning_rate, num_steps):
    """One model trained alone: per-example decoder gather, optax clip + adamw, plain jax."""
    optimizer, step = reference_step(mixture, sweep_spec)
    state, losses = optimizer(learning_rate).init(params), []
    for t in range(num_steps):
        params, state, loss = step(params, state, t, learning_rate)
        losses.append(float(loss))
    return params, np.array(losses)


@functools.lru_cache
def reference_step(mixture, sweep_spec):
    """(optimizer(learning_rate), jitted step(params, opt_state, t, learning_rate)): compiled once
    per width, whatever the learning rate."""
    sqrt_spectra = jnp.sqrt(jnp.asarray(mixture.spectra(), jnp.float32))
    priors = jnp.asarray(mixture.prior_array(), jnp.float32)
    warmup = sweep_spec.warmup_steps

    def optimizer(learning_rate):
        return optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(lambda c: learning_rate * jnp.minimum((c + 1) / warmup,
                                                              jnp.sqrt(warmup / (c + 1))),
                        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))

    def loss_fn(p, x, task):
        block = x[:, :mixture.num_tasks * mixture.task_dim].reshape(
            x.shape[0], mixture.num_tasks, mixture.task_dim)
        y = block[jnp.arange(x.shape[0]), task] * sqrt_spectra[task]
        pred = jnp.einsum("btn,bn->bt", p["decoders"][task], x @ p["encoder"].T)
        return jnp.mean((pred - y) ** 2)

    @jax.jit
    def step(p, s, t, learning_rate):
        key = tasks.batch_key(sweep_spec.data_seed, t)
        x = tasks.sample_inputs(key, sweep_spec.batch_size, mixture.input_dim)
        task = tasks.sample_tasks(key, sweep_spec.batch_size, priors)
        loss, g = jax.value_and_grad(loss_fn)(p, x, task)
        u, s = optimizer(learning_rate).update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    return optimizer, step


def model_slice(params, layout, m):
    group, copy = divmod(m, layout.copies)
    return {name: value[copy] for name, value in params[group].items()}


def test_packed_models_follow_models_trained_alone():
    program = sweep.SweepProgram(MIXTURE, SWEEP)
    state = program.init()
    initial = jax.tree.map(np.array, sweep.unstacked(state["params"]))
    packed_losses = []
    for t in range(SWEEP.num_steps):
        state = program.train(state, t, t + 1)
        packed_losses.append(np.asarray(state["train_loss"]))
    packed_losses = np.stack(packed_losses, axis=1)
    coords = program.model_coords
    checked = 0
    for m in range(program.layout.num_models):
        if coords["learning_rate"][m] != SWEEP.learning_rates[-1] or coords["seed"][m] != 3:
            continue  # One model per width keeps the test fast; every width is covered.
        alone = model_slice(initial, program.layout, m)
        np.testing.assert_allclose(alone["encoder"] @ alone["encoder"].T,
                                   np.eye(coords["width"][m]), atol=1e-5)
        _, ref_losses = reference_run(jax.tree.map(jnp.asarray, alone), MIXTURE, SWEEP,
                                      float(coords["learning_rate"][m]), SWEEP.num_steps)
        np.testing.assert_allclose(packed_losses[m], ref_losses, rtol=2e-4, atol=1e-6,
                                   err_msg=f"model {m} (width {coords['width'][m]})")
        checked += 1
    assert checked == len(SWEEP.widths)


def test_init_depends_only_on_seed_and_width():
    both = sweep.unstacked(sweep.SweepProgram(MIXTURE, SWEEP).init()["params"])
    alone_spec = Sweep(widths=(12,), seeds=(3,), batch_size=96, num_steps=1, record_every=1)
    alone = sweep.unstacked(sweep.SweepProgram(MIXTURE, alone_spec).init()["params"])
    group = SWEEP.widths.index(12)
    copy = SWEEP.seeds.index(3) * len(SWEEP.learning_rates)
    for name in ("encoder", "decoders"):
        np.testing.assert_array_equal(both[group][name][copy], alone[0][name][0])


def test_decoder_init_is_pytorch_linear_default():
    """Decoders are U(−1/√N, 1/√N) at every width N (nn.Linear's default): their variance is
    1/(3N) and their distribution passes a Kolmogorov–Smirnov test, not only the bound."""
    # 128 tasks × 16 outputs: ≥ 4096 values per width, enough for KS to reject a normal draw of
    # the same variance (KS statistic ≈ 0.06, p < 1e-13 at width 2) while a uniform passes.
    layout = model.PackedLayout((2, 5, 12, 24), copies=1, num_tasks=128, task_dim=16,
                                input_dim=24)
    keys = jnp.stack([jax.random.fold_in(jax.random.key(0), w) for w in layout.widths])
    params = jax.jit(functools.partial(model.init_params, layout))(keys)
    for width, group in zip(layout.widths, params):
        dec = np.asarray(group["decoders"], np.float64).ravel()
        bound = 1 / np.sqrt(width)
        # Var(x²) = 4b⁴/45 for x ~ U(−b, b): the sample variance's relative sd is 0.894/√n.
        tolerance = 5 * 0.894 / np.sqrt(dec.size)
        assert abs(dec.var() * 3 * width - 1) < tolerance, (width, dec.var() * 3 * width)
        assert abs(dec.mean()) < 5 * bound / np.sqrt(3 * dec.size), (width, dec.mean())
        ks = scipy.stats.kstest(dec, "uniform", args=(-bound, 2 * bound))
        assert ks.pvalue > 1e-3, (width, ks)
        assert np.abs(dec).max() <= bound
        assert np.abs(dec).max() > 0.99 * bound


@pytest.fixture(scope="module")
def random_params():
    layout = model.PackedLayout((3, 7), copies=2, num_tasks=MIXTURE.num_tasks,
                                task_dim=MIXTURE.task_dim, input_dim=MIXTURE.input_dim)
    keys = jax.random.split(jax.random.key(1), 8)
    # Non-orthonormal encoders and large decoders, so nothing relies on the init's structure.
    return tuple({"encoder": jax.random.normal(keys[2 * g], (2, w, MIXTURE.input_dim)),
                  "decoders": jax.random.normal(keys[2 * g + 1],
                                                (2, MIXTURE.num_tasks, MIXTURE.task_dim, w))}
                 for g, w in enumerate(layout.widths))


def test_population_loss_matches_monte_carlo(random_params):
    sqrt_spectra = np.sqrt(MIXTURE.spectra())
    exact = np.asarray(model.population_task_loss(random_params, jnp.asarray(sqrt_spectra)))
    x = np.random.default_rng(0).standard_normal((400_000, MIXTURE.input_dim))
    for m in range(4):
        p = model_slice(random_params, model.PackedLayout((3, 7), 2, 6, 4, 32), m)
        hidden = x @ np.asarray(p["encoder"], np.float64).T
        for k in range(MIXTURE.num_tasks):
            y = x[:, MIXTURE.block(k)] * sqrt_spectra[k]
            pred = hidden @ np.asarray(p["decoders"][k], np.float64).T
            mc = np.mean(np.sum((pred - y) ** 2, axis=1)) / MIXTURE.traces()[k]
            assert abs(mc - exact[m, k]) < 0.02 * exact[m, k], (m, k, mc, exact[m, k])


def test_alignment_matches_explicit_projector(random_params):
    spectra = MIXTURE.spectra()
    got = np.asarray(model.alignment(random_params, jnp.sqrt(jnp.asarray(spectra))))
    layout = model.PackedLayout((3, 7), 2, 6, 4, 32)
    for m in range(4):
        w = np.asarray(model_slice(random_params, layout, m)["encoder"], np.float64)
        proj = w.T @ np.linalg.inv(w @ w.T) @ w
        for k in range(MIXTURE.num_tasks):
            c = np.zeros((MIXTURE.input_dim,) * 2)
            c[MIXTURE.block(k), MIXTURE.block(k)] = np.diag(spectra[k])
            np.testing.assert_allclose(got[m, k], np.trace(proj @ c) / np.trace(c), atol=2e-5)


def test_rank_deficient_encoder_alignment_is_finite():
    w = np.zeros((1, 4, MIXTURE.input_dim), np.float32)
    w[0, 0, 0] = w[0, 1, 0] = 1.0  # Rank 1: both rows on coordinate 0.
    params = ({"encoder": jnp.asarray(w),
               "decoders": jnp.zeros((1, MIXTURE.num_tasks, MIXTURE.task_dim, 4))},)
    s = np.asarray(model.alignment(params, jnp.sqrt(jnp.asarray(MIXTURE.spectra()))))
    np.testing.assert_allclose(s[0, 0], MIXTURE.spectra()[0, 0] / MIXTURE.traces()[0], atol=1e-6)
    np.testing.assert_allclose(s[0, 1:], 0, atol=1e-6)


def test_zero_units_change_no_metric_given_the_true_widths():
    """A model padded with zero units (as a sweep split over devices holds it)
    has its unpadded metrics when `subspace_alignment` is told its true width: the rank cut
    scales with the width, and this encoder's second direction (eigenvalue ratio 4e-6) is kept
    at width 2 (cut 2e-6) but would be dropped at the padded width 8 (cut 8e-6)."""
    w = np.zeros((1, 2, MIXTURE.input_dim), np.float32)
    w[0, 0, 0], w[0, 1, 1] = 1.0, 2e-3
    rng = np.random.default_rng(0)
    group = {"encoder": jnp.asarray(w), "decoders": jnp.asarray(
        rng.standard_normal((1, MIXTURE.num_tasks, MIXTURE.task_dim, 2)), jnp.float32)}
    sqrt_spectra = jnp.sqrt(jnp.asarray(MIXTURE.spectra()))
    padded = ({"encoder": jnp.pad(group["encoder"], ((0, 0), (0, 6), (0, 0))),
               "decoders": jnp.pad(group["decoders"], ((0, 0), (0, 0), (0, 0), (0, 6)))},)
    want = model.subspace_alignment((group,), sqrt_spectra)
    got = model.subspace_alignment(padded, sqrt_spectra, jnp.asarray([2.0]))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert want[0][0, 0] > 0.9 * float(MIXTURE.spectra()[0, :2].sum() / MIXTURE.traces()[0])
    np.testing.assert_allclose(model.population_task_loss(padded, sqrt_spectra),
                               model.population_task_loss((group,), sqrt_spectra), rtol=1e-6)


def test_task_tiles_place_every_example_once():
    task = jnp.sort(jax.random.randint(jax.random.key(0), (100,), 0, 5))
    tiles = model.task_tiles(task, 5, 8)
    slots = np.asarray(tiles.slot_row)
    assert sorted(slots[slots < 100].tolist()) == list(range(100))
    np.testing.assert_array_equal(slots[np.asarray(tiles.row_slot_B)], np.arange(100))
    tile_of_slot = np.repeat(np.asarray(tiles.tile_task), 8)
    np.testing.assert_array_equal(tile_of_slot[np.asarray(tiles.row_slot_B)], np.asarray(task))


def test_decode_tiles_gradients_match_autodiff_of_a_per_tile_gather():
    keys = jax.random.split(jax.random.key(1), 4)
    task = jnp.sort(jax.random.randint(keys[0], (50,), 0, 5))
    tiles = model.task_tiles(task, 5, 8)
    num_tiles = tiles.tile_task.shape[0]
    hidden = jax.random.normal(keys[1], (3, num_tiles, 8, 7))
    decoders = jax.random.normal(keys[2], (3, 5, 4, 7))
    weights = jax.random.normal(keys[3], (3, num_tiles, 8, 4))

    def reference(h, d):  # Plain gather + einsum, differentiated by JAX.
        return jnp.sum(weights * jnp.einsum("clen,cltn->clet", h, d[:, tiles.tile_task]) ** 2)

    def packed(h, d):
        return jnp.sum(weights * model.decode_tiles(h, d, tiles.tile_task) ** 2)

    want = jax.grad(reference, argnums=(0, 1))(hidden, decoders)
    got = jax.grad(packed, argnums=(0, 1))(hidden, decoders)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_encode_and_its_gradients_match_a_gemm_per_group():
    """`encode` (groups with a GEMM of their own and groups sharing a zero-padded one) and its
    hand-written VJP equal x Wᵀ per group and autodiff of it."""
    shapes = [(1, 3), (2, 128), (2, 5)]  # (C, N): 3 and 10 rows share a GEMM; 256 have their own.
    assert [model._own_gemm(c * n) for c, n in shapes] == [False, True, False]
    keys = jax.random.split(jax.random.key(2), 2 * len(shapes) + 1)
    x = jax.random.normal(keys[0], (16, 8))
    encoders = tuple(jax.random.normal(k, (c, n, 8)) for k, (c, n) in zip(keys[1:], shapes))
    weights = [jax.random.normal(k, (16, c * n)) for k, (c, n) in zip(keys[4:], shapes)]

    def plain(x, encoders):
        return [x @ e.reshape(-1, 8).T for e in encoders]

    def loss(encode_fn):
        return lambda x, encoders: sum(jnp.sum(w * h ** 2)
                                       for w, h in zip(weights, encode_fn(x, encoders)))

    for got, want in zip(model.encode(x, encoders), plain(x, encoders)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    want = jax.grad(loss(plain), argnums=(0, 1))(x, encoders)
    got = jax.grad(loss(model.encode), argnums=(0, 1))(x, encoders)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


# One learning rate so large that its models' gradients stay far above the clip (1.0) while the
# other rate's stay below it: each width group packs two forced and two ordinary models.
CLIP_SWEEP = Sweep(widths=(3, 12), seeds=(0, 3), learning_rate=(1e-3, 10.0),
                   batch_size=96, num_steps=40, record_every=40, warmup_steps=10, tile_size=8)


def per_model_grad_norms(program, params, step):
    """Each model's pre-clip gradient norm on step `step`'s batch, [M]."""
    x_BxD, y_SxBxT, task_SxB = program.batch(step)
    tiles = jax.vmap(lambda task_B: model.task_tiles(
        task_B, program.mixture.num_tasks, program.sweep.tile_size))(task_SxB)
    # Models are independent, so the gradient of the summed loss holds each model's own.
    grads = jax.grad(lambda p: jnp.sum(model.losses(p, x_BxD, y_SxBxT, tiles)))(params)
    return jnp.sqrt(jnp.concatenate([
        sum(jnp.sum(leaf ** 2, axis=tuple(range(1, leaf.ndim))) for leaf in group.values())
        for group in grads]))


def test_clipping_is_per_model_when_it_binds():
    """A model whose gradients blow far past the clip leaves its width-group neighbours exactly
    as if each were trained alone: the clip's global norm is each model's own, not the group's."""
    program = sweep.SweepProgram(MIXTURE, CLIP_SWEEP)
    state = program.init()
    initial = jax.tree.map(np.array, sweep.unstacked(state["params"]))
    norms_fn = jax.jit(functools.partial(per_model_grad_norms, program))
    packed_losses, norms = [], []
    for t in range(CLIP_SWEEP.num_steps):
        norms.append(np.asarray(norms_fn(sweep.unstacked(state["params"]), t)))
        state = program.train(state, t, t + 1)
        packed_losses.append(np.asarray(state["train_loss"]))
    packed_losses, norms = np.stack(packed_losses, axis=1), np.stack(norms)
    coords = program.model_coords
    forced = coords["learning_rate"] == 10.0
    assert not np.asarray(state["diverged"]).any()
    # Not vacuous: from step 1 on (step 0's rate is warm-up-scaled) the forced models' clip
    # binds by a factor > 10 at every step (measured: ≥ 27, median 560); the others' gradient
    # norms stay below the clip (measured ≤ 0.81).
    assert norms[1:, forced].min() > 10, norms[:, forced].min(axis=0)
    assert norms[:, ~forced].max() < 1, norms[:, ~forced].max(axis=0)
    final = jax.tree.map(np.asarray, sweep.unstacked(state["params"]))
    for m in range(program.layout.num_models):  # Every copy of every width.
        alone = model_slice(initial, program.layout, m)
        trained, ref_losses = reference_run(
            jax.tree.map(jnp.asarray, alone), MIXTURE, CLIP_SWEEP,
            float(coords["learning_rate"][m]), CLIP_SWEEP.num_steps)
        where = (f"model {m} (width {coords['width'][m]}, seed {coords['seed'][m]}, "
                 f"rate {coords['learning_rate'][m]})")
        # The forced models' float32 round-off grows with their weights (measured ≤ 4e-4).
        rtol = 2e-3 if forced[m] else 2e-4
        np.testing.assert_allclose(packed_losses[m], ref_losses, rtol=rtol, atol=1e-6,
                                   err_msg=where)
        for name, value in model_slice(final, program.layout, m).items():
            np.testing.assert_allclose(value, trained[name], rtol=0,
                                       atol=rtol * np.abs(trained[name]).max(),
                                       err_msg=f"{where} {name}")

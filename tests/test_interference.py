"""Per-task gradient interference, checked against gradients computed one task at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from rareret import interference
from rareret.synthetic import model, sweep, tasks, theory
from rareret.synthetic.spec import Injection, Sweep, TaskMixture

NUM_TASKS = 5
ABSENT = 3  # A task with no example in the batch.
BATCH, IN_DIM, HIDDEN, OUT_DIM = 48, 3, 6, 2


def mlp_problem(seed=0):
    """A 2-layer tanh MLP with two parameter groups, per-task targets, one task absent."""
    rng = np.random.default_rng(seed)
    groups = {
        "layer1": {"w": jnp.asarray(rng.normal(size=(IN_DIM, HIDDEN)), jnp.float32),
                   "b": jnp.asarray(rng.normal(size=HIDDEN) * 0.1, jnp.float32)},
        "layer2": {"w": jnp.asarray(rng.normal(size=(HIDDEN, OUT_DIM)) / 2, jnp.float32),
                   "b": jnp.asarray(rng.normal(size=OUT_DIM) * 0.1, jnp.float32)},
    }
    present = [t for t in range(NUM_TASKS) if t != ABSENT]
    task_B = jnp.asarray(rng.choice(present, size=BATCH), jnp.int32)  # Unsorted on purpose.
    x_BxD = jnp.asarray(rng.normal(size=(BATCH, IN_DIM)), jnp.float32)
    # Each task has its own target map, so per-task gradients point in different directions.
    maps_KxDxT = rng.normal(size=(NUM_TASKS, IN_DIM, OUT_DIM))
    y_BxT = jnp.asarray(np.einsum("bd,bdt->bt", np.asarray(x_BxD), maps_KxDxT[task_B]),
                        jnp.float32)

    def example_losses(g):
        hidden = jnp.tanh(x_BxD @ g["layer1"]["w"] + g["layer1"]["b"])
        pred = hidden @ g["layer2"]["w"] + g["layer2"]["b"]
        return jnp.mean((pred - y_BxT) ** 2, axis=1)

    return example_losses, groups, task_B


def naive_task_gradients(example_losses, groups, task_B, num_tasks):
    """{group name: [K, P] float64}: jax.grad of each task's mean loss, one task at a time."""
    out = {name: [] for name in groups}
    task_B = np.asarray(task_B)
    for t in range(num_tasks):
        mask = task_B == t
        if mask.any():
            grad = jax.grad(lambda g, mask=mask: jnp.mean(example_losses(g)[mask]))(groups)
        else:
            grad = jax.tree.map(jnp.zeros_like, groups)
        for name in groups:
            out[name].append(np.asarray(ravel_pytree(grad[name])[0], np.float64))
    return {name: np.stack(rows) for name, rows in out.items()}


def naive_stats(grads_KxP):
    gram = grads_KxP @ grads_KxP.T
    norm = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = gram / np.outer(norm, norm)
    cosine[np.outer(norm, norm) == 0] = np.nan
    return gram, cosine, norm


@pytest.fixture(scope="module")
def mlp():
    example_losses, groups, task_B = mlp_problem()
    naive = naive_task_gradients(example_losses, groups, task_B, NUM_TASKS)
    return example_losses, groups, task_B, naive


CHUNKS = (1, 2, 3, NUM_TASKS, NUM_TASKS + 3)


@pytest.fixture(scope="module")
def by_chunk(mlp):
    """`interference` of the MLP for each task_chunk."""
    example_losses, groups, task_B, _ = mlp
    return {chunk: interference.interference(example_losses, groups, task_B, NUM_TASKS, chunk)
            for chunk in CHUNKS}


@pytest.mark.parametrize("task_chunk", CHUNKS)
def test_interference_equals_one_task_at_a_time(mlp, by_chunk, task_chunk):
    naive = mlp[3]
    result = by_chunk[task_chunk]
    assert result.gram.shape == (2, NUM_TASKS, NUM_TASKS)
    assert result.cosine.shape == (2, NUM_TASKS, NUM_TASKS)
    assert result.norm.shape == (2, NUM_TASKS)
    for g, name in enumerate(["layer1", "layer2"]):  # Dict entries, in (sorted) key order.
        gram, cosine, norm = naive_stats(naive[name])
        scale = np.max(np.abs(gram))
        np.testing.assert_allclose(result.gram[g], gram, rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(result.norm[g], norm, rtol=1e-5, atol=1e-6 * np.max(norm))
        np.testing.assert_allclose(result.cosine[g], cosine, rtol=1e-5, atol=1e-5)
        # The absent task: zero gradient, NaN cosines in its row and column only.
        assert result.norm[g, ABSENT] == 0
        nan = np.isnan(np.asarray(result.cosine[g]))
        expected_nan = np.zeros((NUM_TASKS, NUM_TASKS), bool)
        expected_nan[ABSENT, :] = expected_nan[:, ABSENT] = True
        np.testing.assert_array_equal(nan, expected_nan)


def test_task_chunk_does_not_change_the_result(by_chunk):
    results = [by_chunk[chunk] for chunk in CHUNKS]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(np.isnan(b), np.isnan(a))


def test_task_gradients_keep_the_tree_and_match_naive(mlp):
    example_losses, groups, task_B, naive = mlp
    grads = interference.task_gradients(example_losses, groups, task_B, NUM_TASKS, task_chunk=2)
    assert jax.tree.structure(grads) == jax.tree.structure(groups)
    for name in groups:
        for leaf, grad in zip(jax.tree.leaves(groups[name]), jax.tree.leaves(grads[name])):
            assert grad.shape == (NUM_TASKS,) + leaf.shape
        flat = np.stack([np.asarray(ravel_pytree(jax.tree.map(lambda g, t=t: g[t], grads[name]))[0])
                         for t in range(NUM_TASKS)])
        np.testing.assert_allclose(flat, naive[name], rtol=1e-5, atol=1e-6)


def test_tuple_groups_match_dict_groups(mlp):
    example_losses, groups, task_B, _ = mlp
    as_dict = interference.interference(example_losses, groups, task_B, NUM_TASKS)
    as_tuple = interference.interference(
        lambda g: example_losses({"layer1": g[0], "layer2": g[1]}),
        (groups["layer1"], groups["layer2"]), task_B, NUM_TASKS)
    for a, b in zip(as_dict, as_tuple):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_dict_groups_keep_the_callers_order(mlp):
    example_losses, groups, task_B, naive = mlp
    reordered = {"layer2": groups["layer2"], "layer1": groups["layer1"]}
    result = interference.interference(example_losses, reordered, task_B, NUM_TASKS)
    for g, name in enumerate(reordered):
        np.testing.assert_allclose(result.norm[g], naive_stats(naive[name])[2], rtol=1e-4)


def test_gram_stats_properties(by_chunk):
    result = by_chunk[3]
    present = np.array([t != ABSENT for t in range(NUM_TASKS)])
    for gram, cosine, norm in zip(*(np.asarray(a, np.float64) for a in result)):
        np.testing.assert_allclose(np.diag(cosine)[present], 1.0, atol=1e-5)
        assert np.all(np.isnan(np.diag(cosine)[~present]))
        np.testing.assert_array_equal(gram, gram.T)
        np.testing.assert_allclose(cosine, cosine.T, atol=1e-7)
        assert np.all(np.abs(cosine[np.isfinite(cosine)]) <= 1 + 1e-5)
        assert np.min(np.linalg.eigvalsh(gram)) >= -1e-5 * np.max(np.diag(gram))
        np.testing.assert_allclose(norm, np.sqrt(np.diag(gram)), rtol=1e-6)


def test_gram_stats_of_known_vectors():
    grads_KxP = jnp.asarray([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0], [-6.0, -8.0, 0.0]])
    gram, cosine, norm = (np.asarray(a) for a in interference.gram_stats(grads_KxP))
    np.testing.assert_allclose(norm, [5.0, 2.0, 0.0, 10.0])
    np.testing.assert_allclose(gram[0], [25.0, 0.0, 0.0, -50.0])
    assert cosine[0, 1] == 0 and cosine[0, 3] == pytest.approx(-1.0)
    assert np.all(np.isnan(cosine[2])) and np.all(np.isnan(cosine[:, 2]))


def test_weighted_cosine_equals_cosine_of_weighted_sums(mlp, by_chunk):
    naive = mlp[3]
    result = by_chunk[NUM_TASKS]
    rng = np.random.default_rng(1)
    cases = [(np.eye(NUM_TASKS)[4], np.array([0.5, 0.3, 0.2, 0.0, 0.0])),  # rare vs frequent
             (rng.normal(size=NUM_TASKS), rng.normal(size=NUM_TASKS)),  # signed weights
             (rng.uniform(size=NUM_TASKS), rng.uniform(size=NUM_TASKS))]  # absent task weighted
    for g, name in enumerate(["layer1", "layer2"]):
        for a_K, b_K in cases:
            u, v = a_K @ naive[name], b_K @ naive[name]
            expected = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
            got = interference.weighted_cosine(result.gram[g], jnp.asarray(a_K, jnp.float32),
                                               jnp.asarray(b_K, jnp.float32))
            assert float(got) == pytest.approx(expected, abs=2e-5)


# --- the toy's population gradients ----------------------------------------------------------

TOY = TaskMixture(num_tasks=3, task_dim=2, input_dim=8, beta=1.0, alpha=1.0)
TOY_WIDTH = 4


@pytest.fixture(scope="module")
def toy_model():
    rng = np.random.default_rng(2)
    encoder = jnp.asarray(rng.normal(size=(TOY_WIDTH, TOY.input_dim)) / 2, jnp.float32)
    decoders = jnp.asarray(rng.normal(size=(TOY.num_tasks, TOY.task_dim, TOY_WIDTH)), jnp.float32)
    sqrt_spectra = jnp.sqrt(jnp.asarray(TOY.spectra(), jnp.float32))
    return encoder, decoders, sqrt_spectra, model.task_maps(sqrt_spectra, TOY.input_dim)


def test_task_maps_reproduce_targets(toy_model):
    _, _, sqrt_spectra, maps_KxTxD = toy_model
    x = jax.random.normal(jax.random.key(0), (16, TOY.input_dim))
    for k in range(TOY.num_tasks):
        task_B = jnp.full(16, k, jnp.int32)
        np.testing.assert_allclose(x @ maps_KxTxD[k].T, tasks.targets(x, task_B, sqrt_spectra),
                                   rtol=1e-6, atol=1e-6)


def test_population_gradients_are_gradients_of_the_expected_loss(toy_model):
    encoder, decoders, _, maps_KxTxD = toy_model
    got = model.population_task_gradients(encoder, decoders, maps_KxTxD)
    for k in range(TOY.num_tasks):
        def expected_loss(w, k=k):  # E‖D_k W x − T_k x‖² / T under x ~ N(0, I).
            return jnp.sum((decoders[k] @ w - maps_KxTxD[k]) ** 2) / TOY.task_dim
        np.testing.assert_allclose(got[k], jax.grad(expected_loss)(encoder), rtol=1e-5,
                                   atol=1e-6)


def sampled_relative_errors(toy_model, per_task, seed):
    """‖sampled − population‖ / ‖population‖ per task, from `per_task` examples of each task."""
    encoder, decoders, sqrt_spectra, maps_KxTxD = toy_model
    task_B = jnp.repeat(jnp.arange(TOY.num_tasks, dtype=jnp.int32), per_task)
    x = jax.random.normal(jax.random.key(seed), (task_B.shape[0], TOY.input_dim))
    y = tasks.targets(x, task_B, sqrt_spectra)
    sampled = interference.task_gradients(
        lambda groups: model.example_losses(groups[0], decoders, x, y, task_B),
        (encoder,), task_B, TOY.num_tasks)[0]
    population = model.population_task_gradients(encoder, decoders, maps_KxTxD)
    diff = np.asarray(sampled, np.float64) - np.asarray(population, np.float64)
    return (np.linalg.norm(diff.reshape(TOY.num_tasks, -1), axis=1)
            / np.linalg.norm(np.asarray(population).reshape(TOY.num_tasks, -1), axis=1))


def test_population_gradients_are_the_large_batch_limit(toy_model):
    small = sampled_relative_errors(toy_model, 100_000, seed=0)
    large = sampled_relative_errors(toy_model, 400_000, seed=1)
    assert np.all(small < 0.03), small
    # Monte-Carlo error ∝ 1/sqrt(batch): 4× the examples roughly halves it.
    assert np.mean(large) < 0.75 * np.mean(small), (small, large)
    assert np.all(large < 0.02), large


# --- the sweep's interference records --------------------------------------------------------

SWEEP_MIX = TaskMixture(num_tasks=4, task_dim=2, input_dim=8, beta=0.5, alpha=1.0)


def sweep_spec(mode, batch_size=1 << 17):
    return Sweep(widths=(2, 3), seeds=(0,), batch_size=batch_size, num_steps=10,
                       record_every=10, warmup_steps=1, interference_every=1,
                       interference_mode=mode)


def random_params(layout, seed=0):
    """Random params of every packed model (numpy; much cheaper than compiling `init`)."""
    rng = np.random.default_rng(seed)
    return tuple(
        {"encoder": jnp.asarray(rng.normal(size=(layout.copies, width, layout.input_dim))
                                / np.sqrt(layout.input_dim), jnp.float32),
         "decoders": jnp.asarray(rng.uniform(-1, 1, size=(layout.copies, layout.num_tasks,
                                                          layout.task_dim, width))
                                 / np.sqrt(width), jnp.float32)}
        for width in layout.group_widths())


def model_params(params, copies, m):
    group, copy = divmod(m, copies)
    return params[group]["encoder"][copy], params[group]["decoders"][copy]


def direct_rare_frequent(program, params):
    """Cosine of the rare task's gradient with Σ_{k∈F} π_k g_k, from explicit vectors [M]."""
    priors = SWEEP_MIX.prior_array()
    frequent = theory.frequent_tasks(priors)
    out = []
    for m in range(program.layout.num_models):
        grads = np.asarray(model.population_task_gradients(
            *model_params(params, program.layout.copies, m), program.maps_KxTxD), np.float64)
        rare = grads[program.rare_task].ravel()
        common = sum(priors[k] * grads[k] for k in frequent).ravel()
        out.append(rare @ common / (np.linalg.norm(rare) * np.linalg.norm(common)))
    return np.array(out)


def test_sweep_population_matches_sampled_on_a_large_batch():
    population = sweep.SweepProgram(SWEEP_MIX, sweep_spec("population"))
    sampled = sweep.SweepProgram(SWEEP_MIX, sweep_spec("sampled"))
    params = random_params(population.layout)
    stored = sweep.stacked(params, len(population.data_streams))  # As a sweep's state holds them.
    exact = jax.device_get(population.interference(stored, 3))
    noisy = jax.device_get(sampled.interference(stored, 3))
    M, K = population.layout.num_models, SWEEP_MIX.num_tasks
    assert exact["interference"].shape == (M, K, K) and exact["grad_norm"].shape == (M, K)
    assert exact["rare_frequent_cosine"].shape == (M,)
    for name in exact:
        assert np.all(np.isfinite(exact[name])) and np.all(np.isfinite(noisy[name])), name
    np.testing.assert_allclose(noisy["interference"], exact["interference"], atol=0.03)
    np.testing.assert_allclose(noisy["grad_norm"], exact["grad_norm"], rtol=0.05)
    np.testing.assert_allclose(noisy["rare_frequent_cosine"], exact["rare_frequent_cosine"],
                               atol=0.03)
    # The population record is exact: each model's own per-task gradients, model by model.
    direct = direct_rare_frequent(population, params)
    np.testing.assert_allclose(exact["rare_frequent_cosine"], direct, atol=1e-5)
    for m in range(M):
        grads = model.population_task_gradients(
            *model_params(params, population.layout.copies, m), population.maps_KxTxD)
        gram, cosine, norm = naive_stats(np.asarray(grads, np.float64).reshape(K, -1))
        np.testing.assert_allclose(exact["interference_gram"][m], gram, rtol=1e-5,
                                   atol=1e-6 * np.max(np.abs(gram)))
        np.testing.assert_allclose(exact["interference"][m], cosine, atol=1e-5)
        np.testing.assert_allclose(exact["grad_norm"][m], norm, rtol=1e-5)


def test_sampled_interference_uses_each_models_own_stream():
    injection = Injection(gap=(2, 3))
    program = sweep.SweepProgram(SWEEP_MIX, sweep_spec("sampled", batch_size=256), injection)
    params = random_params(program.layout)
    rare = program.rare_task
    gap_M = program.model_coords["gap"]
    batch = jax.jit(program.batch)
    for step in (1, 2):  # Step 1: only the gap-2 stream injects; step 2: only the gap-3 one.
        injecting_M = step % gap_M == gap_M - 1
        assert injecting_M.any() and not injecting_M.all()
        out = jax.device_get(program.interference(
            sweep.stacked(params, len(program.data_streams)), step))
        np.testing.assert_array_equal(out["grad_norm"][:, rare] > 0, injecting_M)
        np.testing.assert_array_equal(np.isnan(out["rare_frequent_cosine"]), ~injecting_M)
        x, y_SxBxT, task_SxB = batch(step)
        for m in range(program.layout.num_models):
            stream = 0 if gap_M[m] == 2 else 1
            gram = direct_gram(*model_params(params, program.layout.copies, m), x,
                               y_SxBxT[stream], task_SxB[stream])
            np.testing.assert_allclose(out["interference_gram"][m], gram, rtol=1e-5, atol=1e-7)


@jax.jit
def direct_gram(encoder, decoders, x, y_BxT, task_B):
    """One model's sampled encoder Gram, from the generic `interference`."""
    return interference.interference(
        lambda groups: model.example_losses(groups[0], decoders, x, y_BxT, task_B),
        (encoder,), task_B, SWEEP_MIX.num_tasks).gram[0]

"""LM gradient interference (rareret/lm/gradients.py) against independent computations.

A tiny decoder (d_model 32, 2 layers, 4 heads, vocab 128, F = 128), a batch B = 4, L = 16 with one
T_CMP and one T_ADD instance injected by `Injector`, and 64 train instances per task. The
references: `jax.grad` of `lm_model.next_token_loss` and of hand-masked sums of optax
per-token
losses, `jax.grad` of LABEL cross-entropies computed from `model.apply`'s logits of the full
4-token rows, and numpy for per-neuron norms, top-K selection, restriction and cosines.

On 4 forced CPU devices (a child process), the record through the explicit FSDP of a mesh
fsdp=4 (`gradients.fsdp_gradients`) against the same record on one device.
"""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from forced_devices import child_json
from rareret.lm import gradients, inject, measurements
from rareret.lm import model as lm_model
from rareret.lm.config import OlmoConfig

CONFIG = OlmoConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=128, max_seq_len=16)
B, L, EOS = 4, 16, 127
INSTANCES, TOP_K, STEP = 64, 8, 0
NUM_TASKS = 2
TEXT = NUM_TASKS  # The background's row in the matrices.


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def group_of(tree):
    return tree["block_0"]["mlp"]


def np_neurons(group):
    """[F, 3·D] float64 per-neuron gradients: up column, gate column, down row."""
    up_gate, down = np.asarray(group["up_gate"], np.float64), np.asarray(group["down"], np.float64)
    return np.concatenate([up_gate[:, 0].T, up_gate[:, 1].T, down], axis=1)


def np_cosine(a, b):
    return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


@pytest.fixture(scope="module")
def setup():
    """Params (init perturbed so gradients are not tiny), the injected batch, owners, tasks."""
    params = lm_model.init_params(CONFIG, jax.random.key(0))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x + np.float32(0.05) * rng.standard_normal(x.shape, np.float32),
                          params)
    tasks = [inject.build_task(inject.TaskSpec("cmp", "cmp", every_n=1, seed=1), 128, (EOS,)),
             inject.build_task(inject.TaskSpec("add", "add", every_n=1, seed=2), 128, (EOS,))]
    injector = inject.Injector(tasks, B, L, EOS, seed=3)
    text = np.random.default_rng(0).integers(0, EOS, size=(B, L), dtype=np.int32)
    tokens, mask = injector.inject(text, STEP)
    task_B = injector.row_tasks(STEP)
    owner = gradients.loss_owner(task_B, mask, NUM_TASKS)
    instances = jnp.asarray(np.stack([t.train[:INSTANCES] for t in tasks]), jnp.int32)
    return dict(params=params, tokens=jnp.asarray(tokens), mask=mask, task_B=task_B,
                owner=owner, instances=instances, tasks=tasks)


@pytest.fixture(scope="module")
def measured(setup):
    s = setup
    # task_rows=2: the two rows holding instances, gathered (`batch_part_gradients`).
    return gradients.lm_interference_jit(CONFIG, s["params"], s["tokens"], s["owner"],
                                         s["instances"], TOP_K, 2, 8, 2)


@pytest.fixture(scope="module")
def direct(setup):
    """Independent gradients of the first-layer MLP: g, each part's sum-normalised gradient
    (hand-masked optax losses), and each task's g_r (LABEL from the full 4-token rows' logits)."""
    s = setup
    tokens, owner = s["tokens"], np.asarray(s["owner"])

    def part_loss(p, mask):
        logits = lm_model.apply(CONFIG, p, tokens)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        return jnp.sum(jnp.where(mask, losses, 0.0)) / (B * (L - 1))

    def label_loss(p, rows):
        full = jnp.concatenate([rows, jnp.full((rows.shape[0], 1), EOS, rows.dtype)], axis=1)
        logits = lm_model.apply(CONFIG, p, full)[:, 1]  # LABEL (position 2) from position 1.
        return optax.softmax_cross_entropy(logits, jax.nn.one_hot(rows[:, 2], 128)).mean()

    @jax.jit
    def all_grads(params, masks, instances):
        g = jax.grad(lambda p: lm_model.next_token_loss(CONFIG, p, tokens))(params)
        parts = [jax.grad(part_loss)(params, m) for m in masks]
        refs = [jax.grad(label_loss)(params, rows) for rows in instances]
        return group_of(g), [group_of(x) for x in parts], [group_of(x) for x in refs]

    masks = [owner == j for j in range(NUM_TASKS + 1)]
    g, parts, refs = all_grads(s["params"], masks, list(s["instances"]))
    return dict(g=g, parts=parts, refs=refs, counts=[m.sum() for m in masks])


def test_task_token_positions(setup):
    """Loss positions 0..2 (targets TOK2, LABEL, EOS) of an injected row are its task's."""
    s = setup
    owner, task_B = np.asarray(s["owner"]), s["task_B"]
    assert sorted(task_B.tolist()) == [-1, -1, 0, 1]
    for b in range(B):
        expected = np.full(L - 1, TEXT)
        if task_B[b] >= 0:
            expected[:3] = task_B[b]
            # The row holds one of its task's train instances, then EOS.
            row = np.asarray(s["tokens"][b])
            assert (s["tasks"][task_B[b]].train == row[:3]).all(axis=1).any() and row[3] == EOS
        np.testing.assert_array_equal(owner[b], expected)


@pytest.mark.parametrize("task_rows", [None, 2, 3])
def test_split_sums_to_full_gradient(setup, direct, task_rows):
    """Parts from all B rows (None) or from the rows holding task tokens gathered (2 of them;
    3: one padding row) equal autodiff of each part's masked loss, and sum to g."""
    s = setup
    parts, counts = jax.jit(gradients.batch_part_gradients, static_argnums=(0, 4, 5))(
        CONFIG, s["params"], s["tokens"], s["owner"], NUM_TASKS, task_rows)
    np.testing.assert_array_equal(counts, direct["counts"])
    for name in ("up_gate", "down"):
        # Each part equals autodiff of its masked sum / B·(L−1) ...
        for j in range(NUM_TASKS + 1):
            assert rel(parts[name][j], direct["parts"][j][name]) < 1e-5, (name, j)
        # ... and g_t + g_nt = g = jax.grad(lm_model.next_token_loss), for every task.
        for k in range(NUM_TASKS):
            g, g_t, g_nt = gradients.split_gradients(parts, k)
            assert rel(g[name], direct["g"][name]) < 1e-6, name
            assert rel(g_t[name] + g_nt[name], direct["g"][name]) < 1e-6, name
            assert rel(g_t[name], direct["parts"][k][name]) < 1e-5, name
    # masked_loss: all-ones weights give the train step's loss; the owners' masks sum to it.
    losses = jax.jit(lambda p, t, w: (
        jax.vmap(lambda wj: gradients.masked_loss(CONFIG, p, t, wj))(w),
        lm_model.next_token_loss(CONFIG, p, t)))
    weights = np.stack([np.ones((B, L - 1))] + [np.asarray(s["owner"]) == j for j in range(3)])
    masked, full = losses(s["params"], s["tokens"], weights.astype(np.float32))
    np.testing.assert_allclose(masked[0], full, rtol=1e-6)
    np.testing.assert_allclose(masked[1:].sum(), full, rtol=1e-6)


def test_too_few_task_rows_give_nan(setup):
    """One gathered row cannot hold the two injected rows: every part is NaN, never a silently
    partial task gradient."""
    s = setup
    parts, _ = jax.jit(gradients.batch_part_gradients, static_argnums=(0, 4, 5))(
        CONFIG, s["params"], s["tokens"], s["owner"], NUM_TASKS, 1)
    assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(parts))


def test_reference_gradient_matches_autodiff(setup, direct):
    s = setup
    # 4 chunks of 16 instances here; `measured` (2 chunks) is checked through its neurons and
    # reference_norm.
    refs = jax.jit(gradients.reference_gradients, static_argnums=(0, 3))(
        CONFIG, s["params"], s["instances"], 4)
    for k in range(NUM_TASKS):
        for name in ("up_gate", "down"):
            assert rel(refs[name][k], direct["refs"][k][name]) < 1e-5, (k, name)


def test_top_neurons_match_direct(direct, measured):
    for k in range(NUM_TASKS):
        g_r = direct["refs"][k]
        norms = np.sqrt((np_neurons(g_r) ** 2).sum(axis=1))  # Hand-computed, 3·D weights each.
        np.testing.assert_allclose(gradients.neuron_norms(g_r), norms, rtol=1e-5)
        expected = np.argsort(-norms, kind="stable")[:TOP_K]
        np.testing.assert_array_equal(gradients.top_neurons(g_r, TOP_K), expected)
        np.testing.assert_array_equal(measured.neurons[k], expected)
    assert gradients.top_k_for(CONFIG) == 64 and gradients.top_k_for(CONFIG, 1000) == 128


def test_grad_cosines_match_numpy(setup, direct, measured):
    s = setup
    cosines = np.asarray(measured.grad_cosine)
    assert cosines.shape == (NUM_TASKS, 3) and np.all(np.abs(cosines) <= 1.0)
    g = np_neurons(direct["g"])
    for k in range(NUM_TASKS):
        neurons = np.asarray(measured.neurons[k])
        g_t = np_neurons(direct["parts"][k])
        g_r = np_neurons(direct["refs"][k])[neurons].reshape(-1)
        expected = [np_cosine(x[neurons].reshape(-1), g_r) for x in (g, g_t, g - g_t)]
        np.testing.assert_allclose(cosines[k], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(measured.reference_norm[k], np.linalg.norm(g_r), rtol=1e-5)
    # The one-task entry point agrees with task 0's row.
    one = jax.jit(gradients.grad_cosines, static_argnums=(0, 5))(
        CONFIG, s["params"], s["tokens"], np.asarray(s["owner"]) == 0, s["instances"][0], TOP_K)
    np.testing.assert_allclose(one, cosines[0], rtol=1e-4, atol=1e-5)


def test_interference_matrix(direct, measured):
    cosine, gram = np.asarray(measured.interference), np.asarray(measured.interference_gram)
    np.testing.assert_allclose(cosine, cosine.T, atol=1e-6)
    np.testing.assert_allclose(np.diag(cosine), 1.0, atol=1e-5)
    keep = np.zeros(CONFIG.mlp_hidden, bool)
    keep[np.asarray(measured.neurons).reshape(-1)] = True
    # Rows: each task's g_r, then the mean loss of the batch's text positions (its part × N/n).
    text = jax.tree.map(lambda x: x * (B * (L - 1)) / direct["counts"][TEXT],
                        direct["parts"][TEXT])
    rows = np.stack([np.where(keep[:, None], np_neurons(x), 0).reshape(-1)
                     for x in direct["refs"] + [text]])
    norms = np.linalg.norm(rows, axis=1)
    np.testing.assert_allclose(gram, rows @ rows.T, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(cosine, rows @ rows.T / np.outer(norms, norms), atol=1e-5)
    np.testing.assert_allclose(measured.grad_norm, norms, rtol=1e-5)
    # The batch version: each task's own tokens' mean-loss gradient in place of g_r.
    batch = np.asarray(measured.batch_interference)
    np.testing.assert_allclose(np.diag(batch), 1.0, atol=1e-5)
    t0 = np.where(keep[:, None], np_neurons(direct["parts"][0]), 0).reshape(-1)
    np.testing.assert_allclose(batch[0, TEXT], np_cosine(t0, rows[TEXT]), atol=1e-5)


def test_absent_task_gives_nan(setup):
    """A task with no token in the batch: its g_t is zero, so cos(g_t, g_r) is NaN."""
    s = setup
    owner = jnp.where(s["owner"] == 1, TEXT, s["owner"])
    out = gradients.lm_interference_jit(CONFIG, s["params"], s["tokens"], owner,
                                        s["instances"], TOP_K, 2)
    assert np.isnan(out.grad_cosine[1, 1]) and np.isfinite(out.grad_cosine[1, [0, 2]]).all()
    assert np.isfinite(out.grad_cosine[0]).all() and out.task_tokens.tolist() == [3, 0]
    assert np.isnan(out.batch_interference[1]).all()
    assert np.isfinite(out.interference).all()  # The reference matrix needs no batch instance.


@pytest.mark.parametrize("instances, length, batch_tokens, chunks", [
    (5000, 3, 4 * 256, 20),  # 250 instances (750 tokens) per chunk; 10 chunks would hold 1,500.
    (5000, 3, 1024 * 4096, 1),  # The paper's batch holds all 5,000.
    (64, 3, 100, 2),
    (12, 5, 4, 12),  # One instance per chunk even when it alone exceeds the batch.
])
def test_reference_chunks_hold_no_more_tokens_than_a_batch(instances, length, batch_tokens,
                                                            chunks):
    """g_r's instances go through in the fewest equal chunks of at most a batch's tokens."""
    assert measurements.reference_chunks(instances, length, batch_tokens) == chunks


def fsdp_child() -> dict:
    """The record of a one-layer decoder (d_model 64, vocab 512; B = 4, L = 64; 62 instances per
    task in 2 chunks: padded to 2 × 4 × 8 on 4 devices) on a mesh fsdp=4 and on one device: each
    field's largest difference (relative to its largest value), each program's temporaries
    per device, and the shapes the fsdp program reduce-scatters (gradients it sums)."""
    from rareret import sharding
    from rareret.lm import train
    from rareret.mesh_spec import MeshSpec

    config = OlmoConfig(d_model=64, n_layers=1, n_heads=4, vocab_size=512, max_seq_len=64)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x + np.float32(0.05) * rng.standard_normal(x.shape,
                                                                                np.float32),
                          lm_model.init_params(config, jax.random.key(0)))
    tasks = [inject.build_task(inject.TaskSpec(kind, kind, every_n=1, seed=seed), 512, (EOS,))
             for kind, seed in (("cmp", 1), ("add", 2))]
    injector = inject.Injector(tasks, B, 64, EOS, seed=3)
    tokens, mask = injector.inject(rng.integers(0, EOS, size=(B, 64), dtype=np.int32), STEP)
    owner = np.asarray(gradients.loss_owner(injector.row_tasks(STEP), mask, NUM_TASKS))
    instances = np.stack([t.train[:62] for t in tasks]).astype(np.int32)
    record = jax.jit(gradients.lm_interference, static_argnums=(0, 5, 6, 7, 8, 9))
    static = (TOP_K, 2, 8, 2)  # top_k, chunks, task_chunk, task_rows.
    mesh = sharding.make_mesh(MeshSpec(data=1, fsdp=4))
    batch = sharding.batch_sharding(mesh)
    split = (jax.device_put(params, train.param_shardings(config, mesh)),
             jax.device_put(tokens, batch), jax.device_put(owner, batch), instances)
    whole = jax.device_put((params, tokens, owner, instances), jax.devices()[0])
    programs = {"fsdp": (record.lower(config, *split, *static, mesh).compile(), split),
                "one": (record.lower(config, *whole, *static, None).compile(), whole)}
    out = {name: compiled(*args) for name, (compiled, args) in programs.items()}
    return {"temp": {name: compiled.memory_analysis().temp_size_in_bytes
                     for name, (compiled, _) in programs.items()},
            "scattered": sorted(set(re.findall(r"(\S+) reduce-scatter\(",
                                               programs["fsdp"][0].as_text()))),
            "difference": {field: float(np.max(np.abs(np.asarray(a, np.float64) - b))
                                        / np.max(np.abs(b)))
                           for field, a, b in zip(gradients.LmInterference._fields,
                                                  out["fsdp"], out["one"])},
            "finite": bool(all(np.isfinite(np.asarray(x)).all() for x in out["one"]))}


def test_fsdp_record_matches_one_device_with_a_share_of_its_memory():
    """The record on a mesh fsdp=4 equals the one-device record up to float32 summation order,
    and each device keeps at most 60% of the one device's temporaries (measured: 49%; left to
    GSPMD, every device ran whole chunks of g_r's instances and the whole batch's logits: 75%).
    No gradient but the first-layer MLP's is summed: the head's [D, V] (V = 512) was, before
    the model's products skipped gradients of weights not differentiated."""
    result = child_json(__file__, "--fsdp-child", devices=4,
                        flags="--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
    print(result)
    difference = result["difference"]
    assert result["finite"] and difference["neurons"] == difference["task_tokens"] == 0, result
    assert max(difference.values()) < 1e-5, result
    assert result["temp"]["fsdp"] <= 0.6 * result["temp"]["one"], result
    assert result["scattered"] and not any("512" in shape for shape in result["scattered"]), result


if __name__ == "__main__" and sys.argv[1:] == ["--fsdp-child"]:
    print(json.dumps(fsdp_child()))

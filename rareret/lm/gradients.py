"""LM gradient interference in the first-layer MLP (docs/method.md §6.8, the LM analogue of §3.6).

What is measured, for injected tasks k = 1..K at one training step (params θ, the step's batch):

- The reference direction g_r^k: the gradient of task k's LABEL loss (`task_loss`: the mean
  cross-entropy of LABEL given TOK1 TOK2, as `inject.eval_batch` / `train.LmModel` score it) over
  the task's train instances, with respect to the first-layer MLP (`params["block_0"]["mlp"]`).
- The batch gradient g: the gradient of the mean next-token loss the train step minimises,
  `model.next_token_loss` = Σ_{b,p} ℓ_{b,p} / (B·(L−1)) over the B·(L−1) loss positions
  (position p predicts token p+1). It is split by loss position into parts: g_t^k, the share of
  task k's tokens, and g_nt^k = g − g_t^k, the share of every other position (text and the other
  tasks' tokens). Every part keeps the normaliser B·(L−1), the batch's total count of predicted
  tokens, not its own token count, so the parts sum to g exactly (`masked_loss`).
- Task tokens: `Injector.inject` marks the 4 written positions 0..3 (TOK1 TOK2 LABEL EOS) of a
  row. A loss position p counts as a task token's when its *target* p+1 is a written token, i.e.
  positions 0, 1, 2: the predictions of TOK2, LABEL and EOS (`task_token_mask`). Position 3
  (EOS → the first text token after the instance) has a text target and counts as text; TOK1
  at position 0 is predicted by nothing.
- Neurons. A neuron f of the MLP (hidden unit f < F) owns 3·D weights: its up and gate columns
  `up_gate[:, 0, f]`, `up_gate[:, 1, f]` and its down row `down[f, :]`. Its gradient magnitude is
  the L2 norm of the gradient over those 3·D weights (`neuron_norms`). Task k's neurons are the
  `top_k` neurons with the largest magnitude of the task gradient g_r^k (`top_neurons`; the paper:
  "top-K neurons by gradient magnitude"), **default `DEFAULT_TOP_K` = 64**, clipped to F. Ties
  go to the lower index (`jax.lax.top_k`).
- `grad_cosine` [K, 3]: cos(g, g_r^k), cos(g_t^k, g_r^k), cos(g_nt^k, g_r^k), every vector
  restricted to task k's top neurons (`restrict`: their 3·D weights each).
- `interference` [K+1, K+1]: the cosine matrix among g_r^1..g_r^K and the background text
  gradient g_bg (the gradient of the mean next-token loss over the batch's loss positions that
  belong to no task), all restricted to the **union** of the K tasks' top neurons (the other
  neurons' weights zeroed, `mask_neurons`), so no task's selection is privileged and the matrix
  is symmetric in the tasks. `batch_interference` is the same matrix with each g_r^k replaced by
  the gradient of the mean loss over task k's tokens in the batch (NaN rows where task k has no
  instance in the batch). Gram, cosine and norms come from `rareret.interference.gram_stats`
  (cosines with a zero vector are NaN).

Reuse of `rareret.interference`: the per-position losses of the rows holding task tokens are
the "examples" and each loss position's owner (task k, or K for text) its "task", so
`interference.task_gradients` linearises their forward pass once and gives every task part's
mean-loss gradient from one backward pass each; `batch_part_gradients` rescales them to the
shared normaliser B·(L−1), and the text part is g minus the task parts.

Cost: one forward + backward pass over the batch (g), one forward + K backward passes over the
rows holding task tokens (`task_rows` of them, typically a few), and per task one forward +
backward over its train instances (inputs TOK1 TOK2 only: the logits of LABEL at position 1
depend on nothing later), `chunks` instances-chunks at a time so the logits
[instances / chunks, 2, V] fit.

All functions are pure and jittable with `config` (and the sizes `top_k`, `num_tasks`, `chunks`,
`task_chunk`, `task_rows`, and a `mesh`) static; only the first-layer MLP's gradients are ever
held, never all parameters'. On a mesh that splits parameters over "fsdp" alone, the gradients
are computed in the train step's explicit FSDP, each device on its share of the rows and
instances (`fsdp_gradients`).

Shapes: see docs/method.md "Shape letters": B batch, L sequence length, V vocabulary, D d_model,
F MLP hidden width, K tasks, I instance length (3 or 4), P flattened restricted parameters.
Axes with no letter are spelt out in the docstrings and left out of suffixes: loss positions
[B, L−1], a task's instances [instances, I], selected neurons [neurons].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from rareret import interference
from rareret.lm import fsdp, inject
from rareret.lm import model as lm_model

DEFAULT_TOP_K = 64  # Neurons per task; clipped to F (`top_k_for`).
LAYER = 0  # The MLP whose neurons are measured: the first layer's, as in the paper.
PARTS = ("all", "task_tokens", "other_tokens")  # grad_cosine's last axis: g, g_t, g_nt.


# ----------------------------------------------------------------------------- losses

def loss_normaliser(tokens_BxL) -> int:
    """B·(L−1): the loss positions of the batch, the train step's mean's denominator."""
    return tokens_BxL.shape[0] * (tokens_BxL.shape[1] - 1)


def masked_loss(config, params, tokens_BxL: jax.Array, weights: jax.Array) -> jax.Array:
    """Σ_{b,p} weights[b, p]·ℓ_{b,p} / (B·(L−1)); weights [B, L−1] over loss positions.

    With all weights 1 it is `model.next_token_loss`; weights that partition the positions
    (masks summing to 1 everywhere) give losses, hence gradients, that sum to it exactly.
    """
    losses = lm_model.token_losses(config, params, tokens_BxL)
    return jnp.sum(losses * weights) / loss_normaliser(tokens_BxL)


def task_token_mask(inject_mask_BxL) -> jax.Array:
    """[B, L−1] bool: loss positions whose target is a written task token (`Injector.inject`'s
    mask [B, L] of TOK1 TOK2 LABEL EOS), i.e. positions 0..2 of injected rows."""
    return jnp.asarray(inject_mask_BxL, bool)[:, 1:]


def loss_owner(task_B, inject_mask_BxL, num_tasks: int) -> jax.Array:
    """[B, L−1] int32: the task k < num_tasks owning each loss position, num_tasks for text.

    task_B: each row's injected task (`Injector.row_tasks`; −1, or any id outside
    [0, num_tasks), for a row without an instance); inject_mask_BxL: `Injector.inject`'s mask.
    """
    task_B = jnp.asarray(task_B, jnp.int32)
    injected_B = (task_B >= 0) & (task_B < num_tasks)
    owned = task_token_mask(inject_mask_BxL) & injected_B[:, None]
    return jnp.where(owned, task_B[:, None], num_tasks).astype(jnp.int32)


def task_losses(config, params, instances: jax.Array) -> jax.Array:
    """Per instance [instances]: cross-entropy of LABEL given TOK1 TOK2.

    instances: [instances, I], rows TOK1 TOK2 LABEL (EOS), e.g. `Task.train` or
    `inject.eval_batch`'s rows. Only TOK1 TOK2 are fed (causal model: the logits at
    LABEL_POS − 1 do not depend on later tokens).
    """
    logits_BxLxV = lm_model.apply(config, params, instances[:, :inject.LABEL_POS])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV[:, inject.LABEL_POS - 1], instances[:, inject.LABEL_POS])


def task_loss(config, params, instances: jax.Array) -> jax.Array:
    """Mean cross-entropy of LABEL over instances [instances, I] (`train.LmModel`'s task_loss)."""
    return task_losses(config, params, instances).mean()


# ----------------------------------------------------------------------------- neurons

def mlp_group(params: dict, layer: int = LAYER) -> dict:
    """{"up_gate": [D, 2, F], "down": [F, D]}: the MLP of block `layer`."""
    return params[f"block_{layer}"]["mlp"]


def with_mlp_group(params: dict, group: dict, layer: int = LAYER) -> dict:
    """`params` with block `layer`'s MLP replaced by `group` (no copy of the other leaves)."""
    block = f"block_{layer}"
    return {**params, block: {**params[block], "mlp": group}}


def neuron_weights(group: dict) -> jax.Array:
    """[F, 3·D]: each neuron's weights (or gradients), up column, gate column, down row."""
    up_gate_Dx2xF, down_FxD = group["up_gate"], group["down"]
    return jnp.concatenate([up_gate_Dx2xF[:, 0].T, up_gate_Dx2xF[:, 1].T, down_FxD], axis=1)


def neuron_norms(group_grads: dict) -> jax.Array:
    """[F]: L2 norm of each neuron's gradient over its 3·D weights (up, gate, down)."""
    rows = neuron_weights(group_grads).astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(rows), axis=1))


def top_k_for(config, top_k: int = DEFAULT_TOP_K) -> int:
    """The neurons per task actually used: min(top_k, F)."""
    return min(top_k, config.mlp_hidden)


def top_neurons(reference_grads: dict, top_k: int) -> jax.Array:
    """[neurons = top_k] int32: the neurons of largest `neuron_norms` of the *task* gradient g_r,
    largest first (ties: lower index first)."""
    return jax.lax.top_k(neuron_norms(reference_grads), top_k)[1].astype(jnp.int32)


def restrict(group_grads: dict, neurons: jax.Array) -> jax.Array:
    """[P = neurons·3·D]: the chosen neurons' gradients, flattened neuron-major."""
    return neuron_weights(group_grads)[neurons].reshape(-1)


def mask_neurons(group_grads: dict, keep_F: jax.Array) -> jax.Array:
    """[P = F·3·D]: all neurons' gradients flattened neuron-major, those with keep_F false zeroed
    (inner products then run over the kept neurons only)."""
    rows = neuron_weights(group_grads)
    return jnp.where(keep_F[:, None], rows, 0).reshape(-1)


# ----------------------------------------------------------------------------- gradients

def reference_gradients(config, params, task_instances: jax.Array, chunks: int = 1) -> dict:
    """g_r of every task: first-layer-MLP gradients of `task_loss`, leaves lead with [K].

    task_instances: [K, instances, I], each task's train instances (`Task.train`, all 5,000 of
    them for the paper's g_r); chunks divides the instances: one chunk of one task in memory
    at a time (`weighted_reference_gradients`).
    """
    count = task_instances.shape[1]
    return weighted_reference_gradients(config, params, task_instances,
                                        jnp.full(count, 1 / count, jnp.float32), chunks)


def weighted_reference_gradients(config, params, task_instances: jax.Array, weights: jax.Array,
                                 chunks: int = 1) -> dict:
    """Per task, the first-layer-MLP gradient of Σ_i weights[i]·(LABEL loss of instance i)
    (`task_losses`); leaves lead with [K].

    task_instances: [K, instances, I]; weights: [instances]; chunks divides the instances: the
    chunks' gradients are summed, one chunk of one task in memory at a time.
    """
    count = task_instances.shape[1]
    if count % chunks:
        raise ValueError(f"reference_gradients: chunks={chunks} must divide the "
                         f"{count} instances per task")
    group = mlp_group(params)

    def chunk_grads(chunk, chunk_weights):
        return jax.grad(lambda g: jnp.sum(
            chunk_weights * task_losses(config, with_mlp_group(params, g), chunk)))(group)

    def one_task(instances):
        by_chunk = instances.reshape(chunks, count // chunks, instances.shape[-1])
        zero = jax.tree.map(jnp.zeros_like, group)
        total, _ = jax.lax.scan(
            lambda acc, chunk: (jax.tree.map(jnp.add, acc, chunk_grads(*chunk)), None),
            zero, (by_chunk, weights.reshape(chunks, -1)))
        return total

    return jax.lax.map(one_task, task_instances)


def batch_part_gradients(config, params, tokens_BxL: jax.Array, owner: jax.Array,
                         num_tasks: int, task_rows: int | None = None,
                         task_chunk: int = 8) -> tuple[dict, jax.Array]:
    """(sum-normalised part gradients, [K+1] position counts) of the first-layer MLP.

    owner: [B, L−1] int, each loss position's task k < K, or K for text (`loss_owner`). Part j's
    gradient is that of Σ_{owner = j} ℓ / (B·(L−1)), so the parts sum to the gradient g of the
    train step's mean loss; leaves lead with [K+1]. (Multiply part j by B·(L−1) / count_j for the
    gradient of part j's own mean loss.)

    Cost: one backward pass over the batch for g, and the tasks' parts from the rows holding
    task tokens only (rows are independent sequences, so their gradients are exact), gathered
    into `task_rows` rows (static; None: all B) and split by `rareret.interference.
    task_gradients`; the text part is g − Σ_k part_k. With fewer `task_rows` than rows holding
    task tokens, every part is NaN.
    """
    group, n = mlp_group(params), loss_normaliser(tokens_BxL)
    counts = jnp.bincount(owner.reshape(-1), length=num_tasks + 1)
    full = jax.grad(lambda g: masked_loss(config, with_mlp_group(params, g), tokens_BxL,
                                          jnp.ones(owner.shape, jnp.float32)))(group)
    rows = tokens_BxL.shape[0] if task_rows is None else task_rows
    held = jnp.nonzero(jnp.any(owner < num_tasks, axis=1), size=rows,
                       fill_value=tokens_BxL.shape[0])[0]  # Padding rows: out of range.
    sub_tokens = jnp.take(tokens_BxL, held, axis=0, mode="fill", fill_value=0)
    sub_owner = jnp.take(owner, held, axis=0, mode="fill", fill_value=num_tasks).reshape(-1)
    complete = jnp.all(jnp.bincount(sub_owner, length=num_tasks + 1)[:num_tasks]
                       == counts[:num_tasks])
    # Task k's positions weigh count_k / n, so task_gradients' means (of the weighted losses)
    # are the sum-normalised parts: linear in each position's loss, so parts of several
    # devices' rows add up in the model's reduce-scatters (`fsdp_gradients`).
    scale = jnp.where(complete, counts.astype(jnp.float32) / n, jnp.nan)[sub_owner]

    def example_losses(g):
        losses = lm_model.token_losses(config, with_mlp_group(params, g), sub_tokens)
        return losses.reshape(-1) * scale

    # Text positions (owner K) fall outside task_gradients' K tasks: weight 0. The rows' pass
    # waits for g's: XLA ran them side by side, both passes' logits live at once.
    tasks = interference.task_gradients(example_losses, lm_model.after(group, full), sub_owner,
                                        num_tasks, task_chunk)
    text = jax.tree.map(lambda f, t: f - jnp.sum(t, axis=0), full, tasks)
    return jax.tree.map(lambda t, x: jnp.concatenate([t, x[None]]), tasks, text), counts


def take(tree, k):
    """Row k of a tree whose leaves lead with an axis."""
    return jax.tree.map(lambda x: x[k], tree)


def split_gradients(parts: dict, k) -> tuple[dict, dict, dict]:
    """(g, g_t, g_nt) for task k from `batch_part_gradients`: the sum of all parts, part k, and
    the sum of the parts other than k."""
    others = lambda x: jnp.sum(jnp.where(  # noqa: E731
        (jnp.arange(x.shape[0]) != k).reshape((-1,) + (1,) * (x.ndim - 1)), x, 0), axis=0)
    return (jax.tree.map(lambda x: jnp.sum(x, axis=0), parts), take(parts, k),
            jax.tree.map(others, parts))


# ----------------------------------------------------------------------------- measurements

class LmInterference(NamedTuple):
    """One record's measurements (K tasks; row/column K of the matrices is background text).

    grad_cosine [K, 3]: cos(g, g_r), cos(g_t, g_r), cos(g_nt, g_r) on task k's top neurons.
    part_norm [K, 3]: |g|, |g_t|, |g_nt| on task k's top neurons.
    reference_norm [K]: |g_r| on task k's top neurons.
    interference, interference_gram [K+1, K+1], grad_norm [K+1]: cosine, inner products and
      norms of (g_r^1..g_r^K, g_bg) on the union of the top neurons.
    batch_interference [K+1, K+1]: the same cosines with g_r^k replaced by the gradient of the
      mean loss over task k's tokens in the batch (NaN where task k is absent).
    neurons [K, top_k] int32: each task's top neurons, largest |g_r| first.
    task_tokens [K]: loss positions owned by each task in the batch.
    """

    grad_cosine: jax.Array
    part_norm: jax.Array
    reference_norm: jax.Array
    interference: jax.Array
    interference_gram: jax.Array
    grad_norm: jax.Array
    batch_interference: jax.Array
    neurons: jax.Array
    task_tokens: jax.Array


def part_cosines(g: dict, g_t: dict, g_nt: dict, g_r: dict, neurons: jax.Array):
    """([3] cos(·, g_r) and [3] norms of g, g_t, g_nt, and |g_r|), all restricted to `neurons`."""
    rows_4xP = jnp.stack([restrict(x, neurons) for x in (g, g_t, g_nt, g_r)])
    _, cosine, norm = interference.gram_stats(rows_4xP.astype(jnp.float32))
    return cosine[3, :3], norm[:3], norm[3]


def task_interference(grads: dict, keep_F: jax.Array) -> interference.Interference:
    """Gram, cosine [1, rows, rows] and norms [1, rows] of gradient rows (leaves lead with
    [rows]) restricted to the neurons keep_F, via `rareret.interference.gram_stats`."""
    rows_xP = jax.vmap(lambda g: mask_neurons(g, keep_F))(grads).astype(jnp.float32)
    return interference.Interference(*(x[None] for x in interference.gram_stats(rows_xP)))


def lm_interference(config, params, tokens_BxL: jax.Array, owner: jax.Array,
                    task_instances: jax.Array, top_k: int = DEFAULT_TOP_K, chunks: int = 1,
                    task_chunk: int = 8, task_rows: int | None = None,
                    mesh: Mesh | None = None) -> LmInterference:
    """Everything recorded at one step (module docstring).

    tokens_BxL: the step's batch, instances injected; owner: `loss_owner` [B, L−1];
    task_instances: [K, instances, I], each task's train instances (g_r); top_k: neurons per
    task (clipped to F); chunks, task_chunk: memory knobs of `reference_gradients` and
    `rareret.interference.task_gradients`; task_rows: at least the batch rows holding task
    tokens (`batch_part_gradients`; None: B); mesh: the params' mesh, whose explicit FSDP
    computes the gradients where it applies (`fsdp_gradients`).
    """
    num_tasks, count = task_instances.shape[:2]
    if mesh is not None and fsdp.applies(mesh):
        refs, parts = fsdp_gradients(config, mesh, params, tokens_BxL, owner, task_instances,
                                     chunks, task_chunk, task_rows)
    else:
        refs, parts = record_gradients(config, params, tokens_BxL, owner, task_instances,
                                       jnp.full(count, 1 / count, jnp.float32), chunks,
                                       task_chunk, task_rows)
    counts = jnp.bincount(owner.reshape(-1), length=num_tasks + 1)
    return interference_of(config, refs, parts, counts, loss_normaliser(tokens_BxL), top_k)


def interference_of(config, refs: dict, parts: dict, counts: jax.Array, normaliser: int,
                    top_k: int = DEFAULT_TOP_K) -> LmInterference:
    """`lm_interference` from the gradients: refs, `reference_gradients`; parts and counts,
    `batch_part_gradients`' of a batch of `normaliser` loss positions."""
    num_tasks = counts.shape[0] - 1
    top_k = top_k_for(config, top_k)
    neurons = jax.vmap(lambda g_r: top_neurons(g_r, top_k))(refs)

    def one_task(k):
        g, g_t, g_nt = split_gradients(parts, k)
        return part_cosines(g, g_t, g_nt, take(refs, k), neurons[k])

    cosine_Kx3, norm_Kx3, ref_norm_K = jax.vmap(one_task)(jnp.arange(num_tasks))
    keep_F = jnp.zeros(config.mlp_hidden, bool).at[neurons.reshape(-1)].set(True)
    # Each part's own mean-loss gradient (zero for an absent part): the rows' scale in the Gram.
    own_mean = jnp.where(counts > 0, normaliser / jnp.maximum(counts, 1), 0.0)
    means = jax.tree.map(lambda x: x * own_mean.reshape((-1,) + (1,) * (x.ndim - 1)), parts)
    background = jax.tree.map(lambda x: x[num_tasks:], means)
    with_refs = jax.tree.map(lambda r, b: jnp.concatenate([r, b]), refs, background)
    stats = task_interference(with_refs, keep_F)
    batch_stats = task_interference(means, keep_F)
    return LmInterference(cosine_Kx3, norm_Kx3, ref_norm_K, stats.cosine[0], stats.gram[0],
                          stats.norm[0], batch_stats.cosine[0], neurons,
                          counts[:num_tasks].astype(jnp.int32))


def record_gradients(config, params, tokens_BxL: jax.Array, owner: jax.Array,
                     task_instances: jax.Array, weights: jax.Array, chunks: int = 1,
                     task_chunk: int = 8, task_rows: int | None = None) -> tuple[dict, dict]:
    """(`weighted_reference_gradients`, `batch_part_gradients`' parts), the batch's passes after
    g_r's (XLA overlapped them: their logits live at once)."""
    refs = weighted_reference_gradients(config, params, task_instances, weights, chunks)
    params = with_mlp_group(params, lm_model.after(mlp_group(params), refs))
    parts, _ = batch_part_gradients(config, params, tokens_BxL, owner, task_instances.shape[0],
                                    task_rows, task_chunk)
    return refs, parts


def fsdp_gradients(config, mesh: Mesh, params, tokens_BxL: jax.Array, owner: jax.Array,
                   task_instances: jax.Array, chunks: int = 1, task_chunk: int = 8,
                   task_rows: int | None = None) -> tuple[dict, dict]:
    """(`reference_gradients`, `batch_part_gradients`' parts) in the train step's explicit FSDP
    (`rareret.lm.fsdp`, on a mesh where it applies; params sharded as the train state's).

    Each device takes its rows of the batch (at most `task_rows` of them holding task tokens)
    and its share of each of the `chunks` chunks of g_r's instances (padded with instances of
    weight 0 to a multiple of the devices), gathers each parameter where the model uses it,
    and sums the MLP's gradients into its shard. Left to GSPMD, every device ran whole chunks
    and the whole batch's logits: on 4 CPU devices at 20M (B = 4, L = 256), 0.39 GB of
    temporaries per device against one device's 0.57 GB; here 0.24 GB (0.27 while the model's
    products also summed the gradients of the weights after the MLP, `model._fsdp_product`).
    """
    devices = fsdp.batch_devices(mesh)
    count = task_instances.shape[1]
    share = -(-count // (chunks * devices))  # A chunk's instances on one device.
    padded = chunks * devices * share
    instances = jnp.pad(task_instances, ((0, 0), (0, padded - count), (0, 0)))
    weights = jnp.where(jnp.arange(padded) < count, 1 / count, 0).astype(jnp.float32)
    rows = None if task_rows is None else min(task_rows, tokens_BxL.shape[0] // devices)
    param_specs = fsdp.param_mesh_specs(config, mesh)
    specs = jax.tree.map(lambda spec: PartitionSpec(None, *spec), mlp_group(param_specs))
    by_row, by_instance = PartitionSpec(fsdp.BATCH_AXES), PartitionSpec(None, fsdp.BATCH_AXES)

    def local(config, params, tokens_bxL, owner_bxL, instances, weights):
        refs, parts = fsdp.sum_gradients(
            record_gradients(config, params, tokens_bxL, owner_bxL, instances, weights, chunks,
                             task_chunk, rows), (specs, specs))
        # The batch's parts: the mean of the devices' (equal-sized) sum-normalised parts.
        return refs, jax.tree.map(lambda x: x / devices, parts)

    return fsdp.per_device(config, mesh, local, (params, tokens_BxL, owner, instances, weights),
                           (param_specs, by_row, by_row, by_instance, by_row), (specs, specs))


def grad_cosines(config, params, tokens_BxL: jax.Array, task_mask, instances: jax.Array,
                 top_k: int = DEFAULT_TOP_K) -> jax.Array:
    """[3] cos(g, g_r), cos(g_t, g_r), cos(g_nt, g_r) for one task on its top-`top_k` neurons.

    task_mask: [B, L−1] bool, the task's loss positions (`task_token_mask` of its rows);
    instances: [instances, I], its train instances.
    """
    owner = jnp.where(jnp.asarray(task_mask, bool), 0, 1).astype(jnp.int32)
    return lm_interference(config, params, tokens_BxL, owner, instances[None],
                           top_k).grad_cosine[0]


lm_interference_jit = jax.jit(lm_interference, static_argnums=(0, 5, 6, 7, 8, 9))


# ----------------------------------------------------------------------------- host side

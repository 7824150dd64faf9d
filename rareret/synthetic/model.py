"""Many linear-bottleneck models of different widths, packed so one GEMM serves them all.

Model m has a shared encoder W ∈ R^{N_m×D} and per-task decoders D_k ∈ R^{T×N_m}; it predicts
ŷ = D_k W x for an example of task k (PAPER.md §1). Models are grouped by width: group g holds
C models (seeds × learning rates × …) of width N_g, stored as

    params[g] = {"encoder": [C, N_g, D], "decoders": [C, K, T, N_g]}

and model index m = g·C + c. Nothing is padded to the widest width.

The forward pass concatenates every encoder into one [ΣN, D] matrix, so the encoder (the bulk of
the work) is one GEMM forward and one backward for all models. The decoders differ per example's
task; instead of gathering a decoder copy per example, the batch (already sorted by task) is laid
out in fixed-size *task tiles*: each tile holds rows of one task, short tasks are padded, and one
batched matmul applies the tile's decoder to all its rows. The padding costs at most K·(tile−1)
decoder rows and is masked out of the loss. The decoder pass has a hand-written VJP
(`decode_tiles`) whose GEMMs all take layouts XLA's CPU GEMM library runs whole.

Shapes: B batch, D input dim, K tasks, T task dim, C models per width group, N width, M models,
S data streams, L tiles of E rows each, R = L·E tiled rows.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = tuple  # One {"encoder", "decoders"} dict per width group.


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Static shape of a packed set of models.

    Models are grouped by (stream, width): every group holds `copies` models (seeds × learning
    rates). A stream is one sequence of task ids over the shared inputs (an injection schedule);
    group g = stream·len(widths) + width index, model m = g·copies + copy.
    """

    widths: tuple[int, ...]
    copies: int
    num_tasks: int
    task_dim: int
    input_dim: int
    streams: int = 1

    @property
    def num_groups(self) -> int:
        return self.streams * len(self.widths)

    @property
    def num_models(self) -> int:
        return self.num_groups * self.copies

    def group_widths(self) -> tuple[int, ...]:
        return self.widths * self.streams

    def model_widths(self) -> np.ndarray:
        """Width of each model, [M]."""
        return np.repeat(np.asarray(self.group_widths()), self.copies)


def init_params(layout: PackedLayout, keys_M: jax.Array) -> Params:
    """Initialises every model from its own key, at its true width (PAPER.md §1).

    Encoder rows are orthonormal: the Q factor of a Gaussian [D, N] matrix, signs fixed by R's
    diagonal. Decoders use PyTorch's nn.Linear default, Kaiming-uniform fan-in U(−1/√N, 1/√N).
    All models' QRs run as ONE batched call, each zero-padded to [D, D] (Householder QR's first
    N columns ignore later columns, and a fixed padded shape keeps a model's init bit-identical
    whatever else is packed with it): concurrent LAPACK calls in one XLA CPU program can
    deadlock its thread pool.
    """
    widths_M = layout.model_widths()
    widest = layout.input_dim
    keys_Mx2 = jax.vmap(jax.random.split)(keys_M)

    def gaussian(key, width):
        return jnp.pad(jax.random.normal(key, (layout.input_dim, width), jnp.float32),
                       ((0, 0), (0, widest - width)))

    draws_MxDxD = jnp.stack([gaussian(k, int(w)) for k, w in zip(keys_Mx2[:, 0], widths_M)])
    q_MxDxD, r_MxDxD = jnp.linalg.qr(draws_MxDxD)
    signs_MxD = jnp.sign(jnp.diagonal(r_MxDxD, axis1=1, axis2=2))
    encoders_MxDxD = jnp.swapaxes(q_MxDxD * signs_MxD[:, None, :], 1, 2)
    params, m = [], 0
    for width in layout.group_widths():
        bound = 1.0 / np.sqrt(width)
        decoders = jnp.stack([jax.random.uniform(
            keys_Mx2[m + c, 1], (layout.num_tasks, layout.task_dim, width), jnp.float32,
            -bound, bound) for c in range(layout.copies)])
        params.append({"encoder": encoders_MxDxD[m:m + layout.copies, :width],
                       "decoders": decoders})
        m += layout.copies
    return tuple(params)


class TaskTiles(NamedTuple):
    """Where each example of a task-sorted batch sits in the task-tiled layout."""

    slot_row_R: jax.Array  # Example held by each tile slot; B (a zero row) for padding.
    row_slot_B: jax.Array  # Slot of each example.
    tile_task: jax.Array  # Task of each tile, [R // tile].


def task_tiles(task_B: jax.Array, num_tasks: int, tile: int) -> TaskTiles:
    """Lays a batch sorted by task out in tiles of `tile` rows, each tile holding one task.

    Pure index arithmetic on per-task counts: XLA's CPU scatter and binary-search loops, the
    obvious way to build it, cost more than the rest of the layout together.
    """
    batch = task_B.shape[0]
    num_tiles = -(-batch // tile) + num_tasks  # Enough for any split of the batch into tasks.
    counts_K = jnp.bincount(task_B, length=num_tasks)
    tiles_K = -(-counts_K // tile)
    end_tile_K = jnp.cumsum(tiles_K)
    first_tile_K, first_row_K = end_tile_K - tiles_K, jnp.cumsum(counts_K) - counts_K
    rows = jnp.arange(batch)
    row_slot_B = first_tile_K[task_B] * tile + rows - first_row_K[task_B]
    tile_task = jnp.sum(jnp.arange(num_tiles)[:, None] >= end_tile_K[None, :-1], axis=1)
    slot_task_R = jnp.repeat(tile_task, tile)
    position_R = jnp.arange(num_tiles * tile) - first_tile_K[slot_task_R] * tile
    slot_row_R = jnp.where(position_R < counts_K[slot_task_R],
                           first_row_K[slot_task_R] + position_R, batch)
    return TaskTiles(slot_row_R.astype(jnp.int32), row_slot_B, tile_task)


@jax.custom_vjp
def _to_tiles(rows_BxF, slot_row_R, row_slot_B):
    padded = jnp.concatenate([rows_BxF, jnp.zeros_like(rows_BxF[:1])])
    return padded[slot_row_R]


def _to_tiles_fwd(rows_BxF, slot_row_R, row_slot_B):
    return _to_tiles(rows_BxF, slot_row_R, row_slot_B), row_slot_B


def _to_tiles_bwd(row_slot_B, grad_RxF):
    # Every example occupies exactly one slot, so the transpose is a gather, not a scatter-add.
    return grad_RxF[row_slot_B], None, None


_to_tiles.defvjp(_to_tiles_fwd, _to_tiles_bwd)


def to_tiles(rows_BxF: jax.Array, tiles: TaskTiles) -> jax.Array:
    """Rows of a task-sorted batch in task-tiled order, padding slots zero: [R, F]."""
    return _to_tiles(rows_BxF, tiles.slot_row_R, tiles.row_slot_B)


@jax.custom_vjp
def decode_tiles(hidden_CxLxExN: jax.Array, decoders_CxKxTxN: jax.Array,
                 tile_task_L: jax.Array) -> jax.Array:
    """Applies each tile's task decoder to its rows, for C models at once: [C, L, E, T]."""
    return jnp.einsum("clen,cltn->clet", hidden_CxLxExN, decoders_CxKxTxN[:, tile_task_L])


def _decode_tiles_fwd(hidden_CxLxExN, decoders_CxKxTxN, tile_task_L):
    residuals = (hidden_CxLxExN, decoders_CxKxTxN[:, tile_task_L], tile_task_L,
                 decoders_CxKxTxN.shape[1])
    return decode_tiles(hidden_CxLxExN, decoders_CxKxTxN, tile_task_L), residuals


def _decode_tiles_bwd(residuals, grad_CxLxExT):
    """Both gradients as batched GEMMs in the layout XLA's CPU GEMM library takes whole.

    Autodiff's decoder gradient contracts the row axis of the errors in place, a layout XLA's
    CPU backend hands to a slow generic loop (≈ 0.14 ms per width group whatever its width, at
    the default config's shapes); the errors are transposed first, behind an optimisation
    barrier so XLA does not fold the transpose back into the GEMM. Tile gradients are summed
    into their tasks with a one-hot GEMM rather than autodiff's scatter-add.
    """
    hidden_CxLxExN, decoders_CxLxTxN, tile_task_L, num_tasks = residuals
    grad_hidden = jnp.einsum("clet,cltn->clen", grad_CxLxExT, decoders_CxLxTxN)
    grad_CxLxTxE = jax.lax.optimization_barrier(jnp.swapaxes(grad_CxLxExT, 2, 3))
    grad_tiles_CxLxTxN = jnp.einsum("clte,clen->cltn", grad_CxLxTxE, hidden_CxLxExN)
    task_of_tile_LxK = jax.nn.one_hot(tile_task_L, num_tasks, dtype=grad_tiles_CxLxTxN.dtype)
    grad_decoders = jnp.einsum("lk,cltn->cktn", task_of_tile_LxK, grad_tiles_CxLxTxN)
    return grad_hidden, grad_decoders, None


decode_tiles.defvjp(_decode_tiles_fwd, _decode_tiles_bwd)


def losses(params: Params, x_BxD: jax.Array, y_SxBxT: jax.Array, tiles: TaskTiles) -> jax.Array:
    """Each model's batch MSE (mean over B·T elements, as torch.nn.MSELoss), [M].

    `y_SxBxT` and `tiles` (fields with a leading S axis) hold each stream's targets and task
    tiles; the groups of `params` are stream-major. Padding slots hold zero inputs and zero
    targets, so they add nothing to the loss or the gradient.
    """
    with jax.named_scope("encoder"):  # Scopes name the stages in profiles (profile_sweep.py).
        encoder_NxD = jnp.concatenate([p["encoder"].reshape(-1, x_BxD.shape[1]) for p in params])
        hidden_BxN = x_BxD @ encoder_NxD.T
    with jax.named_scope("decoder"):
        return _decoded_losses(params, hidden_BxN, y_SxBxT, tiles)


def _decoded_losses(params: Params, hidden_BxN: jax.Array, y_SxBxT: jax.Array,
                    tiles: TaskTiles) -> jax.Array:
    """`losses` from the encoders' outputs: every model's decoder pass on its task tiles."""
    num_streams, batch, task_dim = y_SxBxT.shape
    num_tiles = tiles.tile_task.shape[1]
    tile = tiles.slot_row_R.shape[1] // num_tiles
    groups_per_stream = len(params) // num_streams
    out, start = [], 0
    for stream in range(num_streams):
        groups = params[stream * groups_per_stream:(stream + 1) * groups_per_stream]
        stream_width = sum(p["encoder"].shape[0] * p["encoder"].shape[1] for p in groups)
        stream_tiles = jax.tree.map(lambda a: a[stream], tiles)
        hidden_RxN = to_tiles(hidden_BxN[:, start:start + stream_width], stream_tiles)
        y_LxExT = to_tiles(y_SxBxT[stream], stream_tiles).reshape(num_tiles, tile, task_dim)
        start += stream_width
        offset = 0
        for p in groups:
            copies, _, _, width = p["decoders"].shape
            hidden_LxExCxN = hidden_RxN[:, offset:offset + copies * width].reshape(
                num_tiles, tile, copies, width)
            offset += copies * width
            pred_CxLxExT = decode_tiles(jnp.transpose(hidden_LxExCxN, (2, 0, 1, 3)),
                                        p["decoders"], stream_tiles.tile_task)
            err_CxLxExT = pred_CxLxExT - y_LxExT
            out.append(jnp.sum(err_CxLxExT * err_CxLxExT, axis=(1, 2, 3)))
    return jnp.concatenate(out) / (batch * task_dim)


def population_task_loss(params: Params, sqrt_spectra_KxT: jax.Array) -> jax.Array:
    """Exact normalised per-task loss under x ~ N(0, I), [M, K].

    E‖D_k W x − T_k x‖² = ‖D_k W − T_k‖²_F with T_k = Λ_k^{1/2} B_kᵀ, divided by Tr(C_k) = Σ_j λ_kj.
    """
    num_tasks, task_dim = sqrt_spectra_KxT.shape

    def one(encoder_NxD, decoders_KxTxN):
        gram_NxN = encoder_NxD @ encoder_NxD.T
        fitted_K = jnp.einsum("ktn,nm,ktm->k", decoders_KxTxN, gram_NxN, decoders_KxTxN)
        own_NxKxT = encoder_NxD[:, : num_tasks * task_dim].reshape(-1, num_tasks, task_dim)
        cross_K = jnp.einsum("ktn,nkt,kt->k", decoders_KxTxN, own_NxKxT, sqrt_spectra_KxT)
        trace_K = jnp.sum(sqrt_spectra_KxT ** 2, axis=1)
        return (fitted_K - 2 * cross_K + trace_K) / trace_K

    return jnp.concatenate([jax.vmap(one)(p["encoder"], p["decoders"]) for p in params])


def alignment(params: Params, sqrt_spectra_KxT: jax.Array) -> jax.Array:
    """Subspace alignment s_k = Tr(P_W C_k) / Tr(C_k) of each encoder's row space, [M, K].

    P_W projects onto the row space of W. With W Wᵀ = U Λ Uᵀ, the rows of Λ^{-1/2} Uᵀ W are an
    orthonormal basis of it, so diag(P_W) is their squared column norms; eigen-directions with
    λ ≤ λ_max · N · 1e-6 (singular values below ~1e-3 of the largest) are dropped as rank
    deficiency. No explicit (W Wᵀ)^{-1}, and no SVD (XLA's CPU SVD is pathologically slow at
    some shapes). All models' Grams go through ONE batched eigh, zero-padded to the widest
    width (padding adds only zero eigenvalues, which are dropped): concurrent LAPACK calls in
    one XLA CPU program can deadlock its thread pool.
    """
    num_tasks, task_dim = sqrt_spectra_KxT.shape
    spectra_KxT = sqrt_spectra_KxT ** 2
    widest = max(p["encoder"].shape[1] for p in params)
    highest = jax.lax.Precision.HIGHEST
    grams = [jnp.einsum("cnd,cmd->cnm", p["encoder"], p["encoder"], precision=highest)
             for p in params]
    grams_MxWxW = jnp.concatenate([jnp.pad(g, ((0, 0), (0, widest - g.shape[1]),
                                                (0, widest - g.shape[1]))) for g in grams])
    eig_MxW, vec_MxWxW = jnp.linalg.eigh(grams_MxWxW)
    kept_MxW = eig_MxW > eig_MxW[:, -1:] * widest * 1e-6
    scale_MxW = jnp.where(kept_MxW, jax.lax.rsqrt(jnp.where(kept_MxW, eig_MxW, 1.0)), 0.0)
    out, m = [], 0
    for p in params:
        copies, width, _ = p["encoder"].shape
        vec_CxNxW = vec_MxWxW[m:m + copies, :width]
        basis_CxWxD = scale_MxW[m:m + copies, :, None] * jnp.einsum(
            "cnw,cnd->cwd", vec_CxNxW, p["encoder"], precision=highest)
        proj_diag_CxD = jnp.sum(basis_CxWxD * basis_CxWxD, axis=1)
        own_CxKxT = proj_diag_CxD[:, : num_tasks * task_dim].reshape(copies, num_tasks, task_dim)
        out.append(jnp.sum(spectra_KxT * own_CxKxT, axis=2) / jnp.sum(spectra_KxT, axis=1))
        m += copies
    return jnp.concatenate(out)


def task_maps(sqrt_spectra_KxT: jax.Array, input_dim: int) -> jax.Array:
    """The target maps T_k = Λ_k^{1/2} B_kᵀ as one [K, T, D] array."""
    num_tasks, task_dim = sqrt_spectra_KxT.shape
    blocks_KxTxKxT = (jnp.eye(num_tasks, dtype=sqrt_spectra_KxT.dtype)[:, None, :, None]
                      * jax.vmap(jnp.diag)(sqrt_spectra_KxT)[:, :, None, :])
    maps_KxTxU = blocks_KxTxKxT.reshape(num_tasks, task_dim, num_tasks * task_dim)
    return jnp.pad(maps_KxTxU, ((0, 0), (0, 0), (0, input_dim - num_tasks * task_dim)))


def population_task_gradients(encoder_NxD: jax.Array, decoders_KxTxN: jax.Array,
                              maps_KxTxD: jax.Array) -> jax.Array:
    """Exact per-task encoder gradients under x ~ N(0, I), [K, N, D] (one model).

    Task k's expected per-example loss is ‖D_k W − T_k‖²_F / T (MSE over T outputs), so its
    gradient is (2/T) D_kᵀ (D_k W − T_k); `maps_KxTxD` holds the T_k (see `task_maps`).
    """
    task_dim = maps_KxTxD.shape[1]
    residual_KxTxD = jnp.einsum("ktn,nd->ktd", decoders_KxTxN, encoder_NxD) - maps_KxTxD
    return (2.0 / task_dim) * jnp.einsum("ktn,ktd->knd", decoders_KxTxN, residual_KxTxD)


def example_losses(encoder_NxD: jax.Array, decoders_KxTxN: jax.Array, x_BxD: jax.Array,
                   y_BxT: jax.Array, task_B: jax.Array) -> jax.Array:
    """Per-example MSE of one model, [B] (a plain gather; for measurements, not training)."""
    pred_BxT = jnp.einsum("btn,bn->bt", decoders_KxTxN[task_B], x_BxD @ encoder_NxD.T)
    return jnp.mean((pred_BxT - y_BxT) ** 2, axis=1)

"""Many linear-bottleneck models of different widths, packed so a few GEMMs serve them all.

Model m has a shared encoder W ∈ R^{N_m×D} and per-task decoders D_k ∈ R^{T×N_m}; it predicts
ŷ = D_k W x for an example of task k (docs/method.md §1). Models are grouped by width: group g
holds C models (seeds × learning rates × …) of width N_g, stored as

    params[g] = {"encoder": [C, N_g, D], "decoders": [C, K, T, N_g]}

and model index m = g·C + c. Nothing is padded to the widest width (a sweep split over devices
pads each device's groups to shared widths with zero units: `rareret.synthetic.sweep`).

The encoders (the bulk of the work) take a few GEMMs forward, narrow groups sharing one
(`encode`), and one GEMM backward for all models. The decoders differ per example's
task; instead of gathering a decoder copy per example, the batch (already sorted by task) is laid
out in fixed-size *task tiles*: each tile holds rows of one task, short tasks are padded, and one
batched matmul applies the tile's decoder to all its rows. The padding costs at most K·(tile−1)
decoder rows and is masked out of the loss. The decoder pass has a hand-written VJP
(`decode_tiles`) whose GEMMs all take layouts XLA's CPU GEMM library runs whole.

Shapes: see docs/method.md "Shape letters": B batch, D input dim, K tasks, T task dim, N width,
M models, C models per width group, S data streams. The task-tiled layout's axes have no letter:
[tiles, rows per tile], flattened to [slots] (slots = tiles · rows per tile).
"""

from __future__ import annotations

import dataclasses
import functools
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
    """Initialises every model from its own key, at its true width (docs/method.md §1.6).

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

    slot_row: jax.Array  # Example held by each slot, [slots]; B (a zero row) for padding.
    row_slot_B: jax.Array  # Slot of each example.
    tile_task: jax.Array  # Task of each tile, [tiles].


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
    slot_task = jnp.repeat(tile_task, tile)  # [slots]
    position = jnp.arange(num_tiles * tile) - first_tile_K[slot_task] * tile
    slot_row = jnp.where(position < counts_K[slot_task], first_row_K[slot_task] + position, batch)
    return TaskTiles(slot_row.astype(jnp.int32), row_slot_B, tile_task)


@jax.custom_vjp
def _to_tiles(rows, slot_row, row_slot_B):
    padded = jnp.concatenate([rows, jnp.zeros_like(rows[:1])])
    return padded[slot_row]


def _to_tiles_fwd(rows, slot_row, row_slot_B):
    return _to_tiles(rows, slot_row, row_slot_B), row_slot_B


def _to_tiles_bwd(row_slot_B, grad_slots):
    # Every example occupies exactly one slot, so the transpose is a gather, not a scatter-add.
    return grad_slots[row_slot_B], None, None


_to_tiles.defvjp(_to_tiles_fwd, _to_tiles_bwd)


def to_tiles(rows: jax.Array, tiles: TaskTiles) -> jax.Array:
    """Rows [B, ...] of a task-sorted batch in task-tiled order, padding zero: [slots, ...]."""
    return _to_tiles(rows, tiles.slot_row, tiles.row_slot_B)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _group_tiles(hidden_BxCN, slot_row, row_slot_B, copies):
    batch, width = hidden_BxCN.shape[0], hidden_BxCN.shape[1] // copies
    padding = slot_row == batch
    # One gather from the copies' rows [C·B, N] writes [C, slots, N] directly: gathering
    # [slots, C, N] made XLA transpose it in a second pass.
    rows_CxB = jnp.swapaxes(hidden_BxCN.reshape(batch, copies, width), 0, 1)
    index = batch * jnp.arange(copies)[:, None] + jnp.where(padding, 0, slot_row)
    tiled = rows_CxB.reshape(copies * batch, width)[index]
    return jnp.where(padding[:, None], 0.0, tiled)


def _group_tiles_fwd(hidden_BxCN, slot_row, row_slot_B, copies):
    return _group_tiles(hidden_BxCN, slot_row, row_slot_B, copies), row_slot_B


def _group_tiles_bwd(copies, row_slot_B, grad):
    # As in `_to_tiles`, a gather, again from the rows [C·slots, N], into [B, C, N] directly.
    slots, width = grad.shape[1:]
    index = row_slot_B[:, None] + slots * jnp.arange(copies)
    return grad.reshape(copies * slots, width)[index].reshape(-1, copies * width), None, None


_group_tiles.defvjp(_group_tiles_fwd, _group_tiles_bwd)


def group_tiles(hidden_BxCN: jax.Array, tiles: TaskTiles, copies: int) -> jax.Array:
    """One group's encoder outputs [B, C·N] (task-sorted rows, `encode`) in task-tiled order,
    [C, slots, N], padding zero."""
    return _group_tiles(hidden_BxCN, tiles.slot_row, tiles.row_slot_B, copies)


@jax.custom_vjp
def decode_tiles(hidden: jax.Array, decoders_CxKxTxN: jax.Array,
                 tile_task: jax.Array) -> jax.Array:
    """Applies each tile's task decoder to its rows, for C models at once.

    hidden [C, tiles, rows per tile, N] and tile_task [tiles] → predictions [C, tiles, rows, T].
    """
    return jnp.einsum("clen,cltn->clet", hidden, _tile_decoders(decoders_CxKxTxN, tile_task))


def _tile_decoders(decoders_CxKxTxN: jax.Array, tile_task: jax.Array) -> jax.Array:
    """decoders_CxKxTxN[:, tile_task], [C, tiles, T, N], as one gather from the copies × tasks
    rows: indexing axis 1 made XLA gather [tiles, C, T, N] and transpose it, a second pass."""
    copies, num_tasks = decoders_CxKxTxN.shape[:2]
    rows = (num_tasks * jnp.arange(copies)[:, None] + tile_task).reshape(-1)
    flat = decoders_CxKxTxN.reshape(copies * num_tasks, *decoders_CxKxTxN.shape[2:])
    return flat[rows].reshape(copies, tile_task.shape[0], *decoders_CxKxTxN.shape[2:])


def _decode_tiles_fwd(hidden, decoders_CxKxTxN, tile_task):
    residuals = (hidden, _tile_decoders(decoders_CxKxTxN, tile_task), tile_task,
                 decoders_CxKxTxN.shape[1])
    return decode_tiles(hidden, decoders_CxKxTxN, tile_task), residuals


def _decode_tiles_bwd(residuals, grad):
    """Both gradients as batched GEMMs in the layout XLA's CPU GEMM library takes whole.

    Autodiff's decoder gradient contracts the row axis of the errors in place, a layout XLA's
    CPU backend hands to a slow generic loop whatever the group's width; the errors are
    transposed first, behind an optimisation barrier so XLA does not fold the transpose back
    into the GEMM. Tile gradients are summed into their tasks with a one-hot GEMM rather than
    autodiff's scatter-add, batched over the C models so that it writes [C, K, T, N] in place
    (unbatched, XLA transposed its [K, C, T, N] product: 12% of the CPU time of a step at the
    paper's shapes with 4 seeds).

    hidden [C, tiles, rows, N], tile_decoders [C, tiles, T, N], grad [C, tiles, rows, T].
    """
    hidden, tile_decoders, tile_task, num_tasks = residuals
    grad_hidden = jnp.einsum("clet,cltn->clen", grad, tile_decoders)
    grad_rows_last = jax.lax.optimization_barrier(jnp.swapaxes(grad, 2, 3))  # [C, tiles, T, rows]
    grad_tile_decoders = jnp.einsum("clte,clen->cltn", grad_rows_last, hidden)
    tile_of_task = jax.nn.one_hot(tile_task, num_tasks, dtype=grad_tile_decoders.dtype).T
    tile_of_task_CxKxL = jnp.broadcast_to(tile_of_task, (hidden.shape[0], *tile_of_task.shape))
    grad_decoders = jnp.einsum("ckl,cltn->cktn", tile_of_task_CxKxL, grad_tile_decoders)
    return grad_hidden, grad_decoders, None


decode_tiles.defvjp(_decode_tiles_fwd, _decode_tiles_bwd)


SOLO_GEMM_ROWS = 256  # Encoders of at least this many rows (C·N) …
GEMM_ROW_ALIGN = 32  # … and a multiple of this get a GEMM of their own in `encode`.


def _own_gemm(rows: int) -> bool:
    """Whether a group's encoder of `rows` rows (C·N) gets a GEMM of its own in `encode`."""
    return rows >= SOLO_GEMM_ROWS and rows % GEMM_ROW_ALIGN == 0


@jax.custom_vjp
def encode(x_BxD: jax.Array, encoders: tuple) -> tuple:
    """Each group's encoder outputs x Wᵀ, [B, C·N] per group (encoders [C, N, D] each).

    Wide groups (`_own_gemm`) get a GEMM each; the rest share one, their encoders concatenated
    and zero-padded to a multiple of GEMM_ROW_ALIGN rows. XLA's CPU GEMM ran an output 846
    columns wide 13% slower than one 864 wide, and concatenating every encoder copied them all
    each step: at the paper's shapes this cut the step 3–5% (1 seed) and 8–11% (4 seeds) against
    one GEMM of every encoder. The VJP takes all encoder gradients as one GEMM [ΣN, B] @ [B, D].
    """
    rows = [e.reshape(-1, x_BxD.shape[1]) for e in encoders]
    alone = [_own_gemm(r.shape[0]) for r in rows]
    shared = [r for r, a in zip(rows, alone) if not a]
    if shared:
        ends = np.cumsum([r.shape[0] for r in shared])
        padding = jnp.zeros((-ends[-1] % GEMM_ROW_ALIGN, x_BxD.shape[1]), x_BxD.dtype)
        parts = iter(jnp.split(x_BxD @ jnp.concatenate(shared + [padding]).T, ends, axis=1))
    return tuple(x_BxD @ r.T if a else next(parts) for r, a in zip(rows, alone))


def _encode_fwd(x_BxD, encoders):
    return encode(x_BxD, encoders), (x_BxD, encoders)


def _encode_bwd(residuals, grads):
    x_BxD, encoders = residuals
    # The output gradients transposed, [ΣN, B]: the barrier keeps XLA from folding the
    # transpose back into a GEMM that contracts their batch axis in place.
    grad_NxB = jax.lax.optimization_barrier(jnp.concatenate([g.T for g in grads]))
    ends = np.cumsum([g.shape[1] for g in grads])[:-1]
    grad_x = sum(g @ e.reshape(g.shape[1], -1) for g, e in zip(grads, encoders))
    return grad_x, tuple(part.reshape(e.shape)
                         for part, e in zip(jnp.split(grad_NxB @ x_BxD, ends), encoders))


encode.defvjp(_encode_fwd, _encode_bwd)


def losses(params: Params, x_BxD: jax.Array, y_SxBxT: jax.Array, tiles: TaskTiles) -> jax.Array:
    """Each model's batch MSE (mean over B·T elements, as torch.nn.MSELoss), [M].

    `y_SxBxT` and `tiles` (fields with a leading S axis) hold each stream's targets and task
    tiles; the groups of `params` are stream-major. Padding slots hold zero inputs and zero
    targets, so they add nothing to the loss or the gradient.
    """
    with jax.named_scope("encoder"):  # Scopes name the stages in profiles (profile_sweep.py).
        hidden = encode(x_BxD, tuple(p["encoder"] for p in params))
    with jax.named_scope("decoder"):
        return decoded_losses(params, hidden, y_SxBxT, tiles)


def decoded_losses(params: Params, hidden: tuple, y_SxBxT: jax.Array,
                   tiles: TaskTiles) -> jax.Array:
    """`losses` from the encoders' outputs (`encode`): every model's decoder pass on its task
    tiles."""
    num_streams, batch, task_dim = y_SxBxT.shape
    num_tiles = tiles.tile_task.shape[1]
    tile = tiles.slot_row.shape[1] // num_tiles
    groups_per_stream = len(params) // num_streams
    stream_tiles = [jax.tree.map(lambda a, s=s: a[s], tiles) for s in range(num_streams)]
    y_tiles = [to_tiles(y_BxT, t).reshape(num_tiles, tile, task_dim)  # [tiles, rows, T]
               for y_BxT, t in zip(y_SxBxT, stream_tiles)]
    out = []
    for g, (p, hidden_BxCN) in enumerate(zip(params, hidden)):
        stream = g // groups_per_stream
        copies, width = p["encoder"].shape[:2]
        tiled = group_tiles(hidden_BxCN, stream_tiles[stream], copies)
        pred = decode_tiles(tiled.reshape(copies, num_tiles, tile, width), p["decoders"],
                            stream_tiles[stream].tile_task)  # [C, tiles, rows, T]
        err = pred - y_tiles[stream]
        out.append(jnp.sum(err * err, axis=(1, 2, 3)))
    return jnp.concatenate(out) / (batch * task_dim)


def task_encoder_gradients(grad_hidden_BxN: jax.Array, x_BxD: jax.Array, tiles: TaskTiles,
                           num_tasks: int, copies: int) -> jax.Array:
    """Each task's contribution to one group's encoder gradients, [C, K, N, D].

    `grad_hidden_BxN` is the gradient of the summed batch losses w.r.t. the group's encoder
    outputs ([B, C·N], one stream's task-sorted batch with its `tiles`); the encoder gradient is
    its transpose times x, and task k's part sums its own rows only. The rows are gathered into
    task tiles, each tile's gradient is one batched GEMM, and tiles are summed into tasks with a
    one-hot GEMM, so the work is about that of the ordinary encoder gradient. Summed over k, the
    result is the ordinary gradient.
    """
    num_tiles = tiles.tile_task.shape[0]
    width = grad_hidden_BxN.shape[1]
    grad_tiles = to_tiles(grad_hidden_BxN, tiles).reshape(num_tiles, -1, width)
    x_tiles = to_tiles(x_BxD, tiles).reshape(num_tiles, -1, x_BxD.shape[1])
    per_tile = jnp.einsum("len,led->lnd", grad_tiles, x_tiles)  # [tiles, C·N, D]
    task_of_tile = jax.nn.one_hot(tiles.tile_task, num_tasks, dtype=per_tile.dtype)
    per_task = jnp.einsum("lk,lnd->knd", task_of_tile, per_tile)  # [K, C·N, D]
    return jnp.swapaxes(per_task.reshape(num_tasks, copies, width // copies, -1), 0, 1)


HIGHEST = jax.lax.Precision.HIGHEST
FLOAT32_BITS = 24  # Significand bits of float32.
REFINE_STEPS = 2  # Newton–Schulz steps that re-orthonormalise the alignment basis.


def _pow2(exponent: jax.Array) -> jax.Array:
    """2^exponent as float32, exactly (int32 exponents in [−126, 127])."""
    return jax.lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)


def _split(x: jax.Array, axis: int, bits: int) -> tuple[jax.Array, jax.Array]:
    """x = hi + lo exactly, with hi on the grid 2^(e − bits), 2^e the power of two bounding |x|
    along `axis`: hi / 2^(e − bits) are integers of magnitude ≤ 2^bits."""
    _, exponent = jnp.frexp(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    # Keeps _pow2 in range (hi + lo = x still holds; only slices beyond 2^±100 lose exactness).
    exponent = jnp.clip(exponent, -100, 100)
    hi = jnp.round(x * _pow2(bits - exponent)) * _pow2(exponent - bits)
    return hi, x - hi


def residual(left: jax.Array, right: jax.Array, target: jax.Array) -> jax.Array:
    """left @ right − target, [..., R, N] @ [..., N, D] − [..., R, D], without the float32 GEMM's
    rounding of the product.

    A float32 product carries an error ≈ eps·Σ_n |left_rn right_nd| (eps = 2^-24) however small
    the result, so a residual of a nearly exact fit (a loss of 1e-6 leaves residuals ≈ 1e-3 of
    the product) would be off by ≈ eps/1e-3 relatively. Both factors are split exactly into a
    high part on a fixed-point grid of `bits` bits per row of `left` and per column of `right`,
    and a low part: hi·hi is a sum of N integers of at most 2^(2·bits) on one grid, ≤ 2^24 in
    all, so a float32 matmul forms it exactly in any summation order, and it meets the target
    unrounded; the cross terms are 2^-bits smaller, so is their rounding. Error ≈
    eps·2^-bits·Σ|terms| + eps·|result|, with bits = ⌊(24 − ⌈log2 N⌉)/2⌋ (7 at N = 1024).
    Three matmuls, at HIGHEST precision (true float32 on GPUs and TPUs).
    """
    bits = (FLOAT32_BITS - max(left.shape[-1] - 1, 0).bit_length()) // 2
    left_hi, left_lo = _split(left, -1, bits)
    right_hi, right_lo = _split(right, -2, bits)
    exact = jnp.matmul(left_hi, right_hi, precision=HIGHEST) - target
    return exact + (jnp.matmul(left, right_lo, precision=HIGHEST)
                    + jnp.matmul(left_lo, right_hi, precision=HIGHEST))


def population_task_loss(params: Params, sqrt_spectra_KxT: jax.Array) -> jax.Array:
    """Exact normalised per-task loss under x ~ N(0, I), [M, K].

    E‖D_k W x − T_k x‖² = ‖D_k W − T_k‖²_F with T_k = Λ_k^{1/2} B_kᵀ, divided by the true
    Tr(C_k) = Σ_j λ_kj (1 only under TaskMixture.spectrum_norm='trace'). The residual
    D_k W − T_k is formed directly (`residual`) and squared, so the loss is never negative and
    keeps its relative accuracy (≈ 1e-7 measured) down to losses of 1e-6 and below, where the
    expanded ‖D_k W‖² − 2⟨D_k W, T_k⟩ + ‖T_k‖² cancels in float32.
    """
    num_tasks, task_dim = sqrt_spectra_KxT.shape
    input_dim = params[0]["encoder"].shape[-1]
    maps = task_maps(sqrt_spectra_KxT, input_dim).reshape(num_tasks * task_dim, input_dim)
    trace_K = jnp.sum(sqrt_spectra_KxT ** 2, axis=1)
    out = []
    for p in params:
        copies, _, _, width = p["decoders"].shape
        decoder_rows = p["decoders"].reshape(copies, num_tasks * task_dim, width)
        residual_CxKTxD = residual(decoder_rows, p["encoder"], maps)
        squares_CxK = jnp.sum(jnp.square(residual_CxKTxD).reshape(copies, num_tasks, -1), axis=2)
        out.append(squares_CxK / trace_K)
    return jnp.concatenate(out)


def subspace_alignment(params: Params, sqrt_spectra_KxT: jax.Array, widths_M=None
                       ) -> tuple[jax.Array, jax.Array]:
    """Subspace alignment s_k = Tr(P_W C_k)/Tr(C_k) and its complement 1 − s_k, each [M, K].

    P_W projects onto the row space of W; with e_d the task coordinates,
    s_k = Σ_j λ_kj ‖P_W e_d‖² / Tr(C_k) and 1 − s_k = Σ_j λ_kj ‖e_d − P_W e_d‖² / Tr(C_k). Both
    are sums of squares (never negative), each computed directly, so 1 − s_k (what δ_F needs)
    keeps its relative accuracy for nearly aligned encoders instead of being 1 − s_k rounded
    at float32's 6e-8. Neither is clipped: either may exceed 1 by a few float32 ulps.

    Basis: with W Wᵀ = U Λ Uᵀ, the rows of S W, S = Λ^{-1/2} Uᵀ, span W's row space; eigen-
    directions with λ ≤ λ_max · N · 1e-6 (singular values below ~1e-3 of the largest) are
    dropped as rank deficiency (N: the model's true width, `widths_M` [M] where zero units pad
    the groups, else its group's). Newton–Schulz steps S ← (3I − Q Qᵀ) S / 2, Q = S W, then make
    the rows orthonormal to float32 accuracy, whatever W's conditioning within that threshold.
    For 1 − s_k, P_W e_d = Wᵀ c_d with c_d the least-squares solution of Wᵀ c ≈ e_d, started
    from Sᵀ Q e_d and refined once; e_d − Wᵀ c_d is formed by `residual`. Measured relative
    error of 1 − s_k (N = 256, D = 1024, W's condition number ≤ 30): ≤ 1e-6 at 1 − s = 1e-6,
    ≤ 3e-6 at 1e-8. No explicit (W Wᵀ)^{-1}, no SVD (XLA's CPU SVD is pathologically slow at
    some shapes), no QR (without pivoting it mis-handles rank deficiency). All models' Grams go
    through ONE batched eigh, zero-padded to the widest width (padding adds only zero
    eigenvalues, which sort first and are dropped): concurrent LAPACK calls in one XLA CPU
    program can deadlock its thread pool.
    """
    num_tasks, task_dim = sqrt_spectra_KxT.shape
    used = num_tasks * task_dim
    spectra_KxT = sqrt_spectra_KxT ** 2
    trace_K = jnp.sum(spectra_KxT, axis=1)
    input_dim = params[0]["encoder"].shape[-1]
    coordinates = jnp.eye(used, input_dim, dtype=jnp.float32)  # Rows e_d, d a task coordinate.
    widest = max(p["encoder"].shape[1] for p in params)
    grams = [jnp.einsum("cnd,cmd->cnm", p["encoder"], p["encoder"], precision=HIGHEST)
             for p in params]
    grams_MxWxW = jnp.concatenate([jnp.pad(g, ((0, 0), (0, widest - g.shape[1]),
                                                (0, widest - g.shape[1]))) for g in grams])
    eig_MxW, vec_MxWxW = jnp.linalg.eigh(grams_MxWxW)
    aligned, missed, m = [], [], 0
    for p in params:
        encoder_CxNxD = p["encoder"]
        copies, width, _ = encoder_CxNxD.shape
        # A width-N Gram's eigenpairs are the padded one's N largest.
        eig_CxN = eig_MxW[m:m + copies, widest - width:]
        vec_CxNxN = vec_MxWxW[m:m + copies, :width, widest - width:]
        m += copies
        true_C = (jnp.full(copies, width, jnp.float32) if widths_M is None
                  else widths_M[m - copies:m].astype(jnp.float32))
        kept_CxN = eig_CxN > eig_CxN[:, -1:] * true_C[:, None] * 1e-6
        scale_CxN = jnp.where(kept_CxN, jax.lax.rsqrt(jnp.where(kept_CxN, eig_CxN, 1.0)), 0.0)
        mix_CxNxN = scale_CxN[:, :, None] * jnp.swapaxes(vec_CxNxN, 1, 2)  # S; dropped rows 0.
        for _ in range(REFINE_STEPS):
            basis_CxNxD = jnp.matmul(mix_CxNxN, encoder_CxNxD, precision=HIGHEST)
            overlap_CxNxN = jnp.matmul(basis_CxNxD, jnp.swapaxes(basis_CxNxD, 1, 2),
                                       precision=HIGHEST)
            mix_CxNxN = 1.5 * mix_CxNxN - 0.5 * jnp.matmul(overlap_CxNxN, mix_CxNxN,
                                                           precision=HIGHEST)
        basis_CxNxD = jnp.matmul(mix_CxNxN, encoder_CxNxD, precision=HIGHEST)
        own_CxNxU = basis_CxNxD[:, :, :used]  # U = K·T task coordinates.
        captured_CxU = jnp.sum(own_CxNxU * own_CxNxU, axis=1)
        # c_d = Sᵀ Q e_d solves min ‖Wᵀ c − e_d‖ up to the basis's float32 error; one step of
        # iterative refinement, c ← c − Sᵀ S W (Wᵀ c − e_d), with residuals formed by `residual`
        # (a float32 matmul there leaves ≈ 1e-5 at 1 − s = 1e-8), removes it.
        coef_CxUxN = jnp.matmul(jnp.swapaxes(own_CxNxU, 1, 2), mix_CxNxN, precision=HIGHEST)
        outside_CxUxD = residual(coef_CxUxN, encoder_CxNxD, coordinates)
        pulled_CxUxN = jnp.matmul(outside_CxUxD, jnp.swapaxes(encoder_CxNxD, 1, 2),
                                  precision=HIGHEST)
        pulled_CxUxN = jnp.matmul(pulled_CxUxN, jnp.swapaxes(mix_CxNxN, 1, 2), precision=HIGHEST)
        coef_CxUxN -= jnp.matmul(pulled_CxUxN, mix_CxNxN, precision=HIGHEST)
        outside_CxUxD = residual(coef_CxUxN, encoder_CxNxD, coordinates)
        missed_CxU = jnp.sum(outside_CxUxD * outside_CxUxD, axis=2)
        for values_CxU, out in ((captured_CxU, aligned), (missed_CxU, missed)):
            out.append(jnp.sum(spectra_KxT * values_CxU.reshape(copies, num_tasks, task_dim),
                               axis=2) / trace_K)
    return jnp.concatenate(aligned), jnp.concatenate(missed)


def alignment(params: Params, sqrt_spectra_KxT: jax.Array) -> jax.Array:
    """Subspace alignment s_k = Tr(P_W C_k) / Tr(C_k) of each encoder's row space, [M, K]
    (see `subspace_alignment`, which also gives 1 − s_k directly)."""
    return subspace_alignment(params, sqrt_spectra_KxT)[0]


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
    gradient is (2/T) D_kᵀ (D_k W − T_k); `maps_KxTxD` holds the T_k (see `task_maps`). The
    residual is formed by `residual`, so nearly learned tasks keep accurate gradients (≈ 1e-6
    relative measured at losses of 1e-6; a float32 GEMM leaves ≈ 1e-4).
    """
    num_tasks, task_dim, input_dim = maps_KxTxD.shape
    width = encoder_NxD.shape[0]
    residual_KxTxD = residual(decoders_KxTxN.reshape(num_tasks * task_dim, width), encoder_NxD,
                              maps_KxTxD.reshape(num_tasks * task_dim, input_dim)
                              ).reshape(maps_KxTxD.shape)
    return (2.0 / task_dim) * jnp.einsum("ktn,ktd->knd", decoders_KxTxN, residual_KxTxD,
                                         precision=HIGHEST)


def example_losses(encoder_NxD: jax.Array, decoders_KxTxN: jax.Array, x_BxD: jax.Array,
                   y_BxT: jax.Array, task_B: jax.Array) -> jax.Array:
    """Per-example MSE of one model, [B] (a plain gather; for measurements, not training)."""
    pred_BxT = jnp.einsum("btn,bn->bt", decoders_KxTxN[task_B], x_BxD @ encoder_NxD.T)
    return jnp.mean((pred_BxT - y_BxT) ** 2, axis=1)

"""OLMo-style decoder-only transformer (docs/method.md §6.1) in Flax linen.

Variants (`OlmoConfig.variant`):
- "olmo", the OLMo-7B-0724 recipe: pre-norm blocks x + attn(ln(x)), x + mlp(ln(x)) with a
  non-parametric LayerNorm (no scale or bias); no biases anywhere; RoPE; SwiGLU MLP with a fused
  up-projection of size mlp_ratio·D (hidden F = mlp_ratio·D/2, silu(gate)·up); untied input
  embedding and output head; causal self-attention.
- "olmo2": as HF `Olmo2`: RMSNorm with a learned scale applied to the sublayer *outputs*
  (x + norm(attn(x)), x + norm(mlp(x))), a scaled RMSNorm before the head, and QK-norm (RMSNorm over
  the full q and k projections, all heads together, before RoPE).

RoPE uses HF's "rotate_half" layout (the two halves of each head, not interleaved pairs), so the
weights port to HF `OlmoForCausalLM` / `Olmo2ForCausalLM` unchanged (see `hf_interop`).

Why linen rather than NNX: `Module.apply` already is the pure `(params, tokens) -> logits` that a
jitted, sharded train step wants; `nn.with_logical_partitioning` attaches logical axis names at init
only, and `nn.with_logical_constraint` is a no-op unless logical-axis rules are active, so the same
code runs on a plain CPU and under `jax.set_mesh` + `nn.logical_axis_rules`.
NNX would need split/merge to keep the hot loop functional, and its `with_partitioning` raises
without a mesh in context.

Parameter tree (logical axes in brackets; `None` = never sharded):
  embedding                  [V, D]     (vocab, embed)
  block_{i}/attn/query|key|value [D, H, E]  (embed, heads, kv)
  block_{i}/attn/out         [H, E, D]  (heads, kv, embed)
  block_{i}/mlp/up_gate      [D, 2, F]  (embed, None, mlp)  [:, 0] = up, [:, 1] = gate (OLMo's
                                        fused ff_proj order), split on its own axis so sharding
                                        `mlp` keeps each up/gate pair on one device
  block_{i}/mlp/down         [F, D]     (mlp, embed)
  head                       [D, V]     (embed, vocab)
  olmo2 only: block_{i}/attn/query_norm|key_norm [H, E] (heads, kv);
              block_{i}/attn_out_norm, block_{i}/mlp_out_norm, final_norm [D] (embed)

Init (the paper does not give one): weights truncated normal, std 0.02 cut at ±3σ (OLMo's "normal"
init with cutoff factor 3); norm scales 1. Params are stored in `param_dtype` (float32) and cast to
`compute_dtype` at use; norms, softmax and logits are computed in float32.

Shapes: see docs/method.md "Shape letters": B batch, L sequence length, D d_model, H heads,
E head dimension, F MLP hidden width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rareret import sharding
from rareret.errors import require
from rareret.lm.config import DTYPE_NAMES, OlmoConfig

DTYPES = {name: jnp.dtype(name) for name in DTYPE_NAMES}
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab")
FSDP_AXIS = dict(sharding.RULES)["embed"]  # The mesh axis a parameter's `embed` is split over.
_INIT = nn.initializers.truncated_normal(0.02, lower=-3.0, upper=3.0)


# ----------------------------------------------------------------------------- building blocks

def _param(module: nn.Module, name: str, init, shape: tuple[int, ...],
           axes: tuple[str | None, ...]) -> jax.Array:
    """A parameter in the param dtype with logical axis names: whole or, with
    `OlmoConfig.fsdp_shards` n > 1 (inside the explicit-FSDP map, `rareret.lm.fsdp`), this
    device's 1/n of its `embed` dimension; use it through `_times` or `_whole`."""
    config, dtype = module.config, DTYPES[module.config.param_dtype]
    boxed_init = nn.with_logical_partitioning(init, axes)
    if config.fsdp_shards > 1 and "embed" in axes:
        dim = axes.index("embed")
        shape = shape[:dim] + (shape[dim] // config.fsdp_shards,) + shape[dim + 1:]
    return module.param(name, boxed_init, shape, dtype)


def _weight(module: nn.Module, name: str, shape: tuple[int, ...],
            axes: tuple[str | None, ...]) -> jax.Array:
    """A weight (see `_param`), initialised truncated normal."""
    return _param(module, name, _INIT, shape, axes)


def _whole(config: OlmoConfig, value: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """A parameter from `_param`, gathered whole if it is split."""
    if config.fsdp_shards == 1 or "embed" not in axes:
        return value
    return jax.lax.all_gather(value, FSDP_AXIS, axis=axes.index("embed"), tiled=True)


def _norm_scale(module: nn.Module, name: str, shape: tuple[int, ...],
                axes: tuple[str, ...]) -> jax.Array:
    """A norm scale (init 1), whole, in the param dtype."""
    return _whole(module.config, _param(module, name, nn.initializers.ones, shape, axes), axes)


def _times(config: OlmoConfig, x: jax.Array, w: jax.Array, axes: tuple[str | None, ...],
           contract: int = 1, **kwargs) -> jax.Array:
    """`_matmul(x, w)` in the compute dtype, for a weight `w` from `_param` with logical axes
    `axes`; a split weight is gathered for the product alone (`_fsdp_product`)."""
    compute = DTYPES[config.compute_dtype]

    def product(x, w_whole):
        return _matmul(x, w_whole, contract, **kwargs)

    if config.fsdp_shards == 1 or "embed" not in axes:
        return product(x, w.astype(compute))
    return _fsdp_product(product, axes.index("embed"), compute)(x, w)


def _lookup(config: OlmoConfig, embedding, tokens_BxL: jax.Array) -> jax.Array:
    """The rows [B, L, D] of `tokens_BxL` in the embedding, from `_param` ([V, D], or this
    device's columns [V, D / n] when split over the n devices of "fsdp").

    Split, the table is never gathered: the devices exchange their tokens, each looks all of
    them up in its own columns, and an all-to-all hands each device its own rows' columns. The
    gradient (the transposes: an all-to-all back, a scatter-add into the device's columns) is
    the device's shard of the table's gradient, summed over "fsdp". Gathered instead, every
    device held the whole float32 table and, in training, its whole gradient: 2·V·D·4 bytes
    (77 MB at 20M, 412 MB at 300M), though not at the step's peak, the loss.
    """
    if config.fsdp_shards == 1:
        return jnp.take(embedding, tokens_BxL, axis=0)
    every_tokens = jax.lax.all_gather(tokens_BxL, FSDP_AXIS, axis=0, tiled=True)
    columns = jnp.take(embedding, every_tokens, axis=0)  # [n·B, L, D / n]
    return jax.lax.all_to_all(columns, FSDP_AXIS, split_axis=0, concat_axis=2, tiled=True)


def _fsdp_product(product, dim: int, compute):
    """`product(x, w_whole)` of a weight split on dimension `dim` over the mesh axis "fsdp":
    the weight is cast to `compute` and gathered for the product alone (again in the backward
    pass, which keeps only the shard), and its gradient, in the weight's dtype, is summed
    straight into this device's shard (a reduce-scatter), block by block as the backward pass
    reaches it. Values and gradients are those of casting the gathered weight; cast first, the
    weight moves in the compute dtype, and no whole float32 copy is made beside the cast one
    (XLA's CPU backend still gathers 16-bit floats as float32, then casts): the 20M rung's
    step on 4 CPU devices went from 259 to 230 MB of temporaries per device.

    Each gather and reduce-scatter is tied to the data it serves (`after`). Untied, XLA
    merged the forward, rematerialised and backward gathers of a weight (so every gathered
    weight stayed from the forward pass to the backward pass), and its CPU scheduler left
    every reduce-scatter to the end of the backward pass (every whole gradient live until
    then): 3.0 GB of temporaries per device for the 300M rung on 4 devices, 0.8 GB tied.
    A weight that is not differentiated (`symbolic_zeros` tells) gets no gradient and no tie:
    tied, a record's first-layer-MLP gradients (`gradients.fsdp_gradients`) computed and
    summed the gradient of every weight after that MLP too.
    """
    gather = functools.partial(jax.lax.all_gather, axis_name=FSDP_AXIS, axis=dim, tiled=True)

    @jax.custom_vjp
    def fsdp_product(x, w):
        return product(x, gather(after(w, x).astype(compute)))

    def forward(x, w):
        return fsdp_product(x.value, w.value), (x.value, w.value, _Flag(w.perturbed))

    def backward(residuals, dy):
        x, w, differentiated = residuals
        dx, dw_whole = jax.vjp(product, x, gather(after(w, dy).astype(compute)))[1](dy)
        if not differentiated.value:
            return dx, None
        dw = jax.lax.psum_scatter(dw_whole.astype(w.dtype), FSDP_AXIS, scatter_dimension=dim,
                                  tiled=True)
        return after(dx, dw), dw

    fsdp_product.defvjp(forward, backward, symbolic_zeros=True)
    return fsdp_product


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Flag:
    """A static bool among a custom VJP's residuals (a pytree without leaves)."""

    value: bool


def after(value, anchor):
    """`value` (an array or a tree of them) made to depend on every array of `anchor` (adding
    0 · each one's first element; 0 · x is not folded away for floats, and with a non-finite
    anchor the value turns NaN, as the step's result would anyway): XLA then computes it only
    once `anchor` exists, never merges it with the same computation on another anchor, and
    never holds both computations' temporaries at once (optimisation barriers did none of
    this on the CPU backend)."""
    zeros = [0 * leaf.reshape(-1)[0] for leaf in jax.tree.leaves(anchor)]
    zero = sum(zeros[1:], zeros[0])
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), value)


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """Non-parametric LayerNorm over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)
    variance = jnp.square(centred).mean(-1, keepdims=True)
    return (centred * jax.lax.rsqrt(variance + eps)).astype(x.dtype)


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the trailing `scale.ndim` axes, computed in float32."""
    axes = tuple(range(-scale.ndim, 0))
    x32 = x.astype(jnp.float32)
    mean_square = jnp.square(x32).mean(axes, keepdims=True)
    return (scale.astype(jnp.float32) * x32 * jax.lax.rsqrt(mean_square + eps)).astype(x.dtype)


def _rope_tables(config: OlmoConfig, length: int) -> tuple[jax.Array, jax.Array]:
    """cos and sin, each [L, E], for positions 0..L-1 in HF's rotate_half layout."""
    e = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles_LxE = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles_LxE), jnp.sin(angles_LxE)


def _rotate(x_BxLxHxE: jax.Array, cos_LxE: jax.Array, sin_LxE: jax.Array) -> jax.Array:
    """RoPE in the rotate_half layout, computed in float32."""
    x = x_BxLxHxE.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    out = x * cos_LxE[:, None, :] + rotated * sin_LxE[:, None, :]
    return out.astype(x_BxLxHxE.dtype)


def _matmul(x: jax.Array, w: jax.Array, contract: int = 1, **kwargs) -> jax.Array:
    """Contracts the trailing `contract` axes of x with the leading ones of w as ONE 2-D GEMM
    over all tokens: [..., *w.shape[:contract]] -> [..., *w.shape[contract:]].

    On XLA's CPU backend the same contraction written as a multi-axis einsum ("bld,dtf->bltf")
    ran slower forward + backward (layout copies around XNNPACK dots); the reshapes here are
    free.
    """
    lead, inner = x.shape[:x.ndim - contract], math.prod(w.shape[:contract])
    out = jnp.matmul(x.reshape(-1, inner), w.reshape(inner, -1), **kwargs)
    return out.reshape(*lead, *w.shape[contract:])


def _causal_attention(q_BxLxHxE: jax.Array, k_BxLxHxE: jax.Array, v_BxLxHxE: jax.Array,
                      implementation: str) -> jax.Array:
    """Causal softmax attention, [B, L, H, E] -> [B, L, H, E], softmax in float32.

    "cudnn" uses `jax.nn.dot_product_attention`'s flash kernel; "xla" is written out here (two
    einsums, a masked softmax), which XLA's CPU backend ran faster forward + backward than
    `jax.nn.dot_product_attention(implementation="xla")` at head dims 8-32.
    """
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q_BxLxHxE, k_BxLxHxE, v_BxLxHxE, is_causal=True,
                                            implementation="cudnn")
    length, head_dim = q_BxLxHxE.shape[1], q_BxLxHxE.shape[3]
    scores_BxHxLxL = jnp.einsum("bqhe,bshe->bhqs", q_BxLxHxE, k_BxLxHxE,
                                preferred_element_type=jnp.float32) * head_dim ** -0.5
    causal_LxL = jnp.tril(jnp.ones((length, length), bool))
    scores_BxHxLxL = jnp.where(causal_LxL, scores_BxHxLxL, -jnp.inf)
    probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1).astype(v_BxLxHxE.dtype)
    return jnp.einsum("bhqs,bshe->bqhe", probs_BxHxLxL, v_BxLxHxE)


class _Attention(nn.Module):
    config: OlmoConfig

    @nn.compact
    def __call__(self, x_BxLxD, cos_LxE, sin_LxE):
        config = self.config
        d, h, e = config.d_model, config.n_heads, config.head_dim
        qkv_axes = ("batch", "length", "heads", "kv")
        w_axes = ("embed", "heads", "kv")
        q_BxLxHxE, k_BxLxHxE, v_BxLxHxE = (
            _times(config, x_BxLxD, _weight(self, name, (d, h, e), w_axes), w_axes)
            for name in ("query", "key", "value"))
        if config.variant == "olmo2":
            q_scale = _norm_scale(self, "query_norm", (h, e), ("heads", "kv"))
            k_scale = _norm_scale(self, "key_norm", (h, e), ("heads", "kv"))
            q_BxLxHxE = _rms_norm(q_BxLxHxE, q_scale, config.layer_norm_eps)
            k_BxLxHxE = _rms_norm(k_BxLxHxE, k_scale, config.layer_norm_eps)
        q_BxLxHxE = nn.with_logical_constraint(_rotate(q_BxLxHxE, cos_LxE, sin_LxE), qkv_axes)
        k_BxLxHxE = nn.with_logical_constraint(_rotate(k_BxLxHxE, cos_LxE, sin_LxE), qkv_axes)
        v_BxLxHxE = nn.with_logical_constraint(v_BxLxHxE, qkv_axes)
        out_BxLxHxE = _causal_attention(q_BxLxHxE, k_BxLxHxE, v_BxLxHxE, config.attention)
        out_BxLxHxE = nn.with_logical_constraint(out_BxLxHxE, qkv_axes)
        out_axes = ("heads", "kv", "embed")
        return _times(config, out_BxLxHxE, _weight(self, "out", (h, e, d), out_axes), out_axes,
                      contract=2)


class _Mlp(nn.Module):
    config: OlmoConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        config = self.config
        d, f = config.d_model, config.mlp_hidden
        up_gate_Dx2xF = _weight(self, "up_gate", (d, 2, f), ("embed", None, "mlp"))
        # Two GEMMs, one per half: faster alone than one [D, 2F] GEMM whose output is sliced.
        up_BxLxF, gate_BxLxF = (
            nn.with_logical_constraint(
                _times(config, x_BxLxD, up_gate_Dx2xF[:, i], ("embed", "mlp")),
                ("batch", "length", "mlp")) for i in (0, 1))
        hidden_BxLxF = jax.nn.silu(gate_BxLxF) * up_BxLxF
        down_axes = ("mlp", "embed")
        return _times(config, hidden_BxLxF, _weight(self, "down", (f, d), down_axes), down_axes)


class _Block(nn.Module):
    config: OlmoConfig

    @nn.compact
    def __call__(self, x_BxLxD, cos_LxE, sin_LxE):
        config = self.config
        attn, mlp = _Attention(config, name="attn"), _Mlp(config, name="mlp")
        eps = config.layer_norm_eps
        if config.variant == "olmo":
            x_BxLxD = x_BxLxD + attn(_layer_norm(x_BxLxD, eps), cos_LxE, sin_LxE)
            x_BxLxD = x_BxLxD + mlp(_layer_norm(x_BxLxD, eps))
        else:
            d = config.d_model
            attn_scale = _norm_scale(self, "attn_out_norm", (d,), ("embed",))
            mlp_scale = _norm_scale(self, "mlp_out_norm", (d,), ("embed",))
            x_BxLxD = x_BxLxD + _rms_norm(attn(x_BxLxD, cos_LxE, sin_LxE), attn_scale, eps)
            x_BxLxD = x_BxLxD + _rms_norm(mlp(x_BxLxD), mlp_scale, eps)
        return nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))


class Decoder(nn.Module):
    """The whole model: tokens [B, L] -> (logits [B, L, V] float32, residual stream per layer).

    The residual stream is a tuple of n_layers + 1 arrays [B, L, D]: the embedded tokens, then
    the output of every block (before the final norm).
    """

    config: OlmoConfig

    @nn.compact
    def __call__(self, tokens_BxL):
        config = self.config
        compute = DTYPES[config.compute_dtype]
        embedding_axes = ("vocab", "embed")
        embedding = _weight(self, "embedding", (config.vocab_size, config.d_model),
                            embedding_axes)
        x_BxLxD = _lookup(config, embedding, tokens_BxL).astype(compute)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
        cos_LxE, sin_LxE = _rope_tables(config, tokens_BxL.shape[1])
        block = nn.remat(_Block) if config.remat else _Block
        hidden = [x_BxLxD]
        for i in range(config.n_layers):
            x_BxLxD = block(config, name=f"block_{i}")(x_BxLxD, cos_LxE, sin_LxE)
            hidden.append(x_BxLxD)
        if config.variant == "olmo":
            x_BxLxD = _layer_norm(x_BxLxD, config.layer_norm_eps)
        else:
            scale = _norm_scale(self, "final_norm", (config.d_model,), ("embed",))
            x_BxLxD = _rms_norm(x_BxLxD, scale, config.layer_norm_eps)
        head_axes = ("embed", "vocab")
        head_DxV = _weight(self, "head", (config.d_model, config.vocab_size), head_axes)
        logits_BxLxV = _times(config, x_BxLxD, head_DxV, head_axes,
                              preferred_element_type=jnp.float32)
        logits_BxLxV = nn.with_logical_constraint(logits_BxLxV, ("batch", "length", "vocab"))
        return logits_BxLxV, tuple(hidden)


# ----------------------------------------------------------------------------- public API

def _check_tokens(config: OlmoConfig, tokens_BxL) -> None:
    require(tokens_BxL.ndim == 2 and jnp.issubdtype(tokens_BxL.dtype, jnp.integer),
            f"tokens: shape {tokens_BxL.shape} dtype {tokens_BxL.dtype}; need an integer "
            f"[B, L] array")
    require(tokens_BxL.shape[1] <= config.max_seq_len,
            f"tokens: length {tokens_BxL.shape[1]} exceeds max_seq_len={config.max_seq_len}")


def _dummy_tokens() -> jax.Array:
    return jnp.zeros((1, 1), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: OlmoConfig, rng: jax.Array) -> dict:
    """Fresh params (plain arrays in `param_dtype`).

    To init sharded: `jax.jit(init_params, static_argnums=0, out_shardings=...)`.
    """
    return nn.unbox(Decoder(config).init(rng, _dummy_tokens())["params"])


def apply(config: OlmoConfig, params: dict, tokens_BxL: jax.Array) -> jax.Array:
    """Logits [B, L, V] in float32."""
    return apply_with_hidden(config, params, tokens_BxL)[0]


def apply_with_hidden(config: OlmoConfig, params: dict,
                      tokens_BxL: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Logits [B, L, V] float32 and the residual stream: n_layers + 1 arrays [B, L, D]."""
    _check_tokens(config, tokens_BxL)
    return Decoder(config).apply({"params": params}, tokens_BxL)


def token_losses(config: OlmoConfig, params: dict, tokens_BxL: jax.Array) -> jax.Array:
    """Next-token cross-entropy at every loss position, [B, L−1] (position p predicts p+1).

    The cross-entropy is taken at all L positions (the last one's target, wrapped round, is
    dropped with its loss) rather than of the logits' first L − 1: their slice and its
    gradient's padding were [B, L, V] copies (14 MB fewer temporaries per device for the 20M
    step on 4 CPU devices)."""
    logits_BxLxV = apply(config, params, tokens_BxL)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV, jnp.roll(tokens_BxL, -1, axis=1))[:, :-1]


def next_token_loss(config: OlmoConfig, params: dict, tokens_BxL: jax.Array) -> jax.Array:
    """The training objective: mean next-token cross-entropy over every position but the last."""
    return token_losses(config, params, tokens_BxL).mean()


def _boxed_shapes(config: OlmoConfig) -> dict:
    return jax.eval_shape(Decoder(config).init, jax.random.key(0), _dummy_tokens())["params"]


def param_shapes(config: OlmoConfig) -> dict:
    """The param tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return nn.unbox(_boxed_shapes(config))


def logical_partition_specs(config: OlmoConfig) -> dict:
    """The param tree of logical `PartitionSpec`s (names from LOGICAL_AXES, or None).

    Map it to a mesh with `nn.logical_to_mesh_sharding(specs, mesh, rules)`.
    """
    return nn.get_partition_spec(_boxed_shapes(config))


def count_params(params) -> int:
    """Number of scalars in a param tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))

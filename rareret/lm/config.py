"""The size and numerics of an OLMo-style model (`OlmoConfig`) and its parameter count; no JAX,
so specs and analysis can validate and describe a model without building one."""

from __future__ import annotations

import dataclasses

from rareret.errors import is_int, is_number, require

DTYPE_NAMES = ("float32", "bfloat16")
VARIANTS = ("olmo", "olmo2")
ATTENTION_IMPLS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class OlmoConfig:
    """Size and numerics of one OLMo-style model.

    `mlp_ratio` is the fused up-projection size over d_model (8 in OLMo: up-proj 8·D, hidden 4·D).
    `attention`: "xla" (plain masked-softmax attention, any backend) or "cudnn" (the flash kernel
    of `jax.nn.dot_product_attention`, NVIDIA GPUs with bfloat16 compute).
    `fsdp_shards`: 1 for whole parameters; n inside the explicit-FSDP map of `rareret.lm.fsdp`,
    where each device holds 1/n of every parameter's `embed` dimension and the model gathers a
    parameter over the mesh axis "fsdp" where it uses it.
    """

    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int = 50304
    mlp_ratio: int = 8
    variant: str = "olmo"
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    layer_norm_eps: float = 1e-5
    attention: str = "xla"
    fsdp_shards: int = 1

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "vocab_size", "mlp_ratio", "max_seq_len",
                     "fsdp_shards"):
            value = getattr(self, name)
            require(is_int(value) and value > 0,
                    f"OlmoConfig.{name}={value!r}: must be a positive integer")
        require(self.d_model % self.n_heads == 0,
                f"OlmoConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        require(self.head_dim % 2 == 0,
                f"OlmoConfig: head dim d_model/n_heads={self.head_dim} must be even for RoPE")
        require(self.mlp_ratio % 2 == 0,
                f"OlmoConfig.mlp_ratio={self.mlp_ratio}: must be even (the fused up-projection "
                f"holds equal up and gate halves)")
        require(self.variant in VARIANTS,
                f"OlmoConfig.variant={self.variant!r}: must be one of {VARIANTS}")
        for name in ("param_dtype", "compute_dtype"):
            value = getattr(self, name)
            require(value in DTYPE_NAMES, f"OlmoConfig.{name}={value!r}: must be one of {DTYPE_NAMES}")
        for name in ("rope_theta", "layer_norm_eps"):
            value = getattr(self, name)
            require(is_number(value) and value > 0,
                    f"OlmoConfig.{name}={value!r}: must be a positive number")
        require(isinstance(self.remat, bool), f"OlmoConfig.remat={self.remat!r}: must be a bool")
        require(self.attention in ATTENTION_IMPLS,
                f"OlmoConfig.attention={self.attention!r}: must be one of {ATTENTION_IMPLS}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        """F, the SwiGLU hidden width (half the fused up-projection)."""
        return self.mlp_ratio * self.d_model // 2


def param_count(config: OlmoConfig) -> dict[str, int]:
    """Parameter counts by formula.

    total; non_embedding = total minus the input embedding and the output head (2·V·D);
    olmo_non_embedding = total minus the input embedding only, OLMo's
    `num_params(include_embedding=False)`, the count the ladder's rung names follow.
    Per layer: attention 4·D², MLP 3·D·F (= 12·D² at mlp_ratio 8); olmo2 adds 4·D norm scales
    per layer (q, k, attention-out, MLP-out) and D for the final norm.
    """
    d, v = config.d_model, config.vocab_size
    per_layer = 4 * d * d + 3 * d * config.mlp_hidden
    final = 0
    if config.variant == "olmo2":
        per_layer += 4 * d
        final = d
    non_embedding = config.n_layers * per_layer + final
    return {"total": non_embedding + 2 * v * d, "non_embedding": non_embedding,
            "olmo_non_embedding": non_embedding + v * d}

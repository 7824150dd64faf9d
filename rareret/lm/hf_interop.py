"""Export to and import from Hugging Face `transformers` OLMo (variant "olmo") and OLMo 2 ("olmo2").

Checked against transformers' `modeling_olmo.py` / `modeling_olmo2.py`: q/k/v/o_proj,
gate_proj/up_proj/down_proj and lm_head are bias-free `nn.Linear`s storing weight [out, in];
RoPE uses rotate_half; OLMo's LayerNorm is non-parametric with eps fixed at 1e-5; OLMo 2 applies
`q_norm`/`k_norm` to the full [H·E] projections and `post_attention_layernorm` /
`post_feedforward_layernorm` to the sublayer outputs. Exports set `clip_qkv=None`,
`tie_word_embeddings=False`, `attention_bias=False`, no grouped-query attention, and no special
token ids (set `pad/bos/eos_token_id` on the returned config to match a tokenizer).

`from_hf_state` maps HF-named tensors (weights, or an HF model's gradients) to our tree with the
same mapping `from_hf` uses.

torch and transformers are an optional extra, imported only inside these functions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from rareret.errors import require
from rareret.lm.config import OlmoConfig
from rareret.lm.model import DTYPES, param_shapes

# A param path is a tuple of dict keys; a trailing int selects [:, i] of the fused up_gate kernel.
# Kinds: "copy" (same layout), "flat" (norm scale, flattened), or an int n_in: a kernel whose first
# n_in axes are inputs, stored by torch as weight [prod(out axes), prod(in axes)].
Pair = tuple[tuple, str, object]
_UP, _GATE = 0, 1


def _pairs(config: OlmoConfig) -> Iterator[Pair]:
    """(our param path, HF state-dict key, kind) for every HF tensor."""
    yield ("embedding",), "model.embed_tokens.weight", "copy"
    for i in range(config.n_layers):
        ours, hf = f"block_{i}", f"model.layers.{i}."
        for name, proj in (("query", "q"), ("key", "k"), ("value", "v")):
            yield (ours, "attn", name), f"{hf}self_attn.{proj}_proj.weight", 1
        yield (ours, "attn", "out"), f"{hf}self_attn.o_proj.weight", 2
        yield (ours, "mlp", "up_gate", _UP), f"{hf}mlp.up_proj.weight", 1
        yield (ours, "mlp", "up_gate", _GATE), f"{hf}mlp.gate_proj.weight", 1
        yield (ours, "mlp", "down"), f"{hf}mlp.down_proj.weight", 1
        if config.variant == "olmo2":
            yield (ours, "attn", "query_norm"), f"{hf}self_attn.q_norm.weight", "flat"
            yield (ours, "attn", "key_norm"), f"{hf}self_attn.k_norm.weight", "flat"
            yield (ours, "attn_out_norm"), f"{hf}post_attention_layernorm.weight", "flat"
            yield (ours, "mlp_out_norm"), f"{hf}post_feedforward_layernorm.weight", "flat"
    if config.variant == "olmo2":
        yield ("final_norm",), "model.norm.weight", "flat"
    yield ("head",), "lm_head.weight", 1


def _lookup(tree: dict, keys: tuple):
    for key in keys:
        tree = tree[key]
    return tree


def _get(params: dict, path: tuple) -> np.ndarray:
    if isinstance(path[-1], int):
        return np.asarray(_lookup(params, path[:-1]))[:, path[-1]]
    return np.asarray(_lookup(params, path))


def _to_hf_layout(value: np.ndarray, kind) -> np.ndarray:
    if kind == "copy":
        return value
    if kind == "flat":
        return value.reshape(-1)
    return value.reshape(math.prod(value.shape[:kind]), -1).T


def _from_hf_layout(value: np.ndarray, kind, shape: tuple[int, ...]) -> np.ndarray:
    return (value if kind in ("copy", "flat") else value.T).reshape(shape)


def _imports():
    import torch
    import transformers
    return torch, transformers


def _to_torch(value: np.ndarray):
    torch, _ = _imports()
    if value.dtype == jnp.bfloat16:  # torch cannot read ml_dtypes' bfloat16; widening is exact.
        return torch.from_numpy(value.astype(np.float32, order="C")).to(torch.bfloat16)
    return torch.from_numpy(np.array(value, order="C"))  # A writable, contiguous copy.


def _hf_config(config: OlmoConfig):
    _, transformers = _imports()
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        intermediate_size=config.mlp_hidden, num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
        hidden_act="silu", max_position_embeddings=config.max_seq_len,
        rope_theta=float(config.rope_theta), attention_bias=False, tie_word_embeddings=False,
        pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if config.variant == "olmo":
        require(config.layer_norm_eps == 1e-5,
                f"to_hf: layer_norm_eps={config.layer_norm_eps} cannot be exported; HF OLMo fixes "
                f"its LayerNorm eps at 1e-5")
        return transformers.OlmoConfig(**common, clip_qkv=None)
    return transformers.Olmo2Config(**common, rms_norm_eps=float(config.layer_norm_eps))


def to_hf(config: OlmoConfig, params: dict):
    """(transformers OlmoConfig or Olmo2Config, state dict of torch tensors) for `params`."""
    params = jax.device_get(params)
    state = {key: _to_torch(_to_hf_layout(_get(params, path), kind))
             for path, key, kind in _pairs(config)}
    return _hf_config(config), state


def to_hf_model(config: OlmoConfig, params: dict):
    """A transformers `OlmoForCausalLM` / `Olmo2ForCausalLM` holding `params`, in eval mode."""
    _, transformers = _imports()
    hf_config, state = to_hf(config, params)
    model_cls = (transformers.OlmoForCausalLM if config.variant == "olmo"
                 else transformers.Olmo2ForCausalLM)
    model = model_cls(hf_config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_hf(config: OlmoConfig, params: dict, directory: str | os.PathLike) -> None:
    """Writes `params` as a transformers checkpoint (config.json + safetensors) to `directory`."""
    to_hf_model(config, params).save_pretrained(directory)


def _rope_theta(hf_config) -> float:
    """theta from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling` (4.x)."""
    rope = (getattr(hf_config, "rope_parameters", None)
            or getattr(hf_config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    require(rope_type == "default",
            f"from_hf: rope_type={rope_type!r} is not supported; only 'default'")
    return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def _config_from_hf(hf_config, param_dtype: str) -> OlmoConfig:
    model_type = hf_config.model_type
    require(model_type in ("olmo", "olmo2"),
            f"from_hf: model_type={model_type!r} is not supported; allowed: 'olmo', 'olmo2'")
    d, heads = hf_config.hidden_size, hf_config.num_attention_heads
    checks = {
        "hidden_act": (hf_config.hidden_act, "silu"),
        "attention_bias": (hf_config.attention_bias, False),
        "tie_word_embeddings": (hf_config.tie_word_embeddings, False),
        "num_key_value_heads": (hf_config.num_key_value_heads, heads),
        "head_dim": (getattr(hf_config, "head_dim", None) or d // heads, d // heads),
        "clip_qkv": (getattr(hf_config, "clip_qkv", None), None),
    }
    for name, (value, allowed) in checks.items():
        require(value == allowed, f"from_hf: {name}={value!r} is not supported; need {allowed!r}")
    mlp_ratio, rest = divmod(2 * hf_config.intermediate_size, d)
    require(rest == 0, f"from_hf: intermediate_size={hf_config.intermediate_size} is not a "
                       f"multiple of hidden_size/2={d / 2}")
    eps = 1e-5 if model_type == "olmo" else hf_config.rms_norm_eps
    return OlmoConfig(
        d_model=d, n_layers=hf_config.num_hidden_layers, n_heads=heads,
        vocab_size=hf_config.vocab_size, mlp_ratio=mlp_ratio, variant=model_type,
        rope_theta=_rope_theta(hf_config), max_seq_len=hf_config.max_position_embeddings,
        param_dtype=param_dtype, layer_norm_eps=float(eps))


def _set(tree: dict, path: tuple, value: np.ndarray) -> None:
    *keys, last = path
    for key in keys:
        tree = tree.setdefault(key, {})
    tree[last] = value


def from_hf_state(config: OlmoConfig, state) -> dict:
    """Our parameter tree (float32 numpy) from HF-named tensors: a mapping from every state-dict
    key `to_hf(config, ...)` writes to a numpy-convertible array in HF's layout.

    The mapping is a pure relayout (transposes, reshapes, the up/gate fusion), so it maps
    anything laid out like the HF weights, e.g. the gradients of an HF model's loss, to the
    matching leaves of our tree.
    """
    shapes = param_shapes(config)
    params, parts = {}, {}
    for path, key, kind in _pairs(config):
        require(key in state, f"from_hf: checkpoint has no tensor {key!r}")
        value = np.asarray(state[key], np.float32)
        fused = isinstance(path[-1], int)
        shape = _lookup(shapes, path[:-1] if fused else path).shape
        if fused:
            parts.setdefault(path[:-1], {})[path[-1]] = _from_hf_layout(
                value, kind, shape[:1] + shape[2:])
        else:
            _set(params, path, _from_hf_layout(value, kind, shape))
    for path, halves in parts.items():
        _set(params, path, np.stack([halves[_UP], halves[_GATE]], axis=1))
    return params


def from_hf(model_or_directory, param_dtype: str = "float32") -> tuple[OlmoConfig, dict]:
    """(OlmoConfig, params) from a transformers OLMo / OLMo 2 model or a saved checkpoint dir."""
    torch, transformers = _imports()
    model = model_or_directory
    if isinstance(model, (str, os.PathLike)):
        require(os.path.isdir(model), f"from_hf: {model}: no such checkpoint directory")
        model = transformers.AutoModelForCausalLM.from_pretrained(model)
    require(isinstance(model, torch.nn.Module),
            f"from_hf: got {type(model).__name__}; need a transformers model or a directory")
    config = _config_from_hf(model.config, param_dtype)
    state = model.state_dict()
    params = from_hf_state(config, {
        key: state[key].detach().to(torch.float32).cpu().numpy()
        for _, key, _ in _pairs(config) if key in state})
    return config, jax.tree.map(lambda x: jnp.asarray(x, DTYPES[param_dtype]), params)

"""Distributed alignment search (DAS; Geiger et al. 2024) for the injected task T_CMP.

The causal model of T_CMP is X → O ← Y with X = val(TOK1), Y = val(TOK2), O = [X < Y]. DAS asks
whether a network holds X (or Y) in a k-dimensional linear subspace of a hidden representation
h ∈ R^D, e.g. the residual stream after some layer at some position.

Interchange intervention. For a base input b and a source input s, with a rotation R ∈ O(D)
whose first k columns are Q [D, k], replace the first k coordinates of Rᵀh(b) by those of Rᵀh(s)
and rotate back:
    h' = R [(Rᵀh(s))[:k]; (Rᵀh(b))[k:]] = h(b) + Q Qᵀ (h(s) − h(b)),
then run the rest of the network on b with h' in place of h(b). The intervened output should be
the causal model's counterfactual output: for variable X, O = [val_s(TOK1) < val_b(TOK2)]; for
Y, O = [val_b(TOK1) < val_s(TOK2)]. Interchange-intervention accuracy (IIA) is the fraction of
pairs whose intervened argmax equals that label.

Interface (any network): inputs are a pytree of arrays with a leading pair axis N.
  hidden_fn(inputs) -> h [B, D]                 the representation at the intervention site;
  rest_fn(inputs, h) -> logits [B, C]           the rest of the network, run on `inputs` with h
                                                 replaced at the site.
With `state` given (`fit`, `iia`, `interchange_logits`), they are called as
hidden_fn(state, inputs) and rest_fn(state, inputs, h) and `state` (e.g. model params) is passed
to the compiled programs as an argument: closed-over arrays would be embedded as constants.
Targets [N] index the last logits axis: label-candidate indices (C = 2 for T_CMP, ordered as
`inject.label_candidates`: 0 = True token, 1 = False token, `Pairs.label_index`) or, if rest_fn
returns the full vocabulary, token ids (`Pairs.label`). Both functions must be pure and
traceable by JAX (they are jitted, and rest_fn is differentiated with respect to h).

Default: parametrisation of R. The intervention depends on R only through the span of its first
k columns (h' above uses Q Qᵀ), so rareret learns Q = qr(W).Q, the orthonormal factor of a free
matrix W [D, k] (reduced QR, differentiated through by JAX), and never forms the other D − k
columns; `complete_rotation` builds a full R ∈ O(D) whose first k columns are Q. This is
equivalent to pyvene's full-D orthogonal parametrisation (PyTorch's `orthogonal`) for the
interchange, at O(D·k²) per step instead of O(D³). W starts with i.i.d. N(0, 1) entries, so an
Adam step of size lr per coordinate is a relative (angular) change of about lr, whatever D.
The projection is computed in float32 and h' is cast back to h's dtype before rest_fn.

Default: training budget (`fit`). Adam (optax) on W, constant lr 3e-2, 1,000 steps of 256 pairs
(minibatches drawn without replacement, reshuffled each epoch, seeded by `seed`), minimising the
mean cross-entropy of the counterfactual label under the intervened logits. On the planted
network of tests/test_lm_das.py (D = 16), lr 1e-2 left |cos(q, u)| at 0.93-0.97 after 500 steps
over five seeds, lr 3e-2 reached 0.97-0.99 (held-out IIA 0.985-0.998); the test uses 400 steps.
h(b) and h(s) do not depend on W, so `fit` computes them once for all pairs (in chunks of
`batch`) and each step runs only rest_fn (forward and backward).

Default: pairs (`counterfactual_pairs`). A pair is (base, source, counterfactual label), base and
source both rows of ONE split of the task (TOK1, TOK2); training pairs come from the train split
and held-out pairs from the test split, so no test instance is ever a base or source input of a
training pair (the counterfactual combination (TOK1_s, TOK2_b), which the network never sees as
an input, may be a row of either split). Exactly ⌊count/2⌋ pairs have a counterfactual label
that differs from the base label (the rest keep it): for each pair, whether it differs is fixed
first (a shuffled half/half assignment); the base is then drawn uniformly from the split rows for
which such a source exists, and the source uniformly from the split rows that give the wanted
counterfactual label. A "differs" pair cannot have a base with val(TOK2) = 0 (X swapped) or
val(TOK1) = 99 (Y swapped): no source flips [X < Y] there. Without the balance a pair would
change the label only about a third of the time, and the base label alone would score ~2/3 IIA.
Pairs are drawn with replacement (duplicates are possible and rare: 5,000² bases × sources).

Held-out evaluation: `iia` on pairs from the test split, with the Q learnt on train-split pairs.
With half the pairs changing the label, leaving h alone scores exactly 1/2.

Caveat (the interpretability illusion of Makelov et al. 2023): a high IIA shows that the
subspace can carry X, not that the network computes X there. Where the site also holds a
direction the network reads for the other operand, a subspace mixing the two can pass part of X
into that read-out: in the planted test, a network whose output takes X from the input (the
site's copy of X unused) still scores IIA ≈ 0.70 with k = 1, against ≈ 0.50 when the site holds
no X and ≈ 0.99 when the output does read X at the site.

LM site (`lm_site_fns`): hidden_fn / rest_fn for the OLMo decoder at residual-stream index
`layer` (the index into `model.apply_with_hidden`'s hidden tuple: 0 = embedded tokens, ℓ ≥ 1 =
output of block ℓ−1, i.e. after ℓ blocks) and sequence `position`, reading logits at
`read_position` (LABEL_POS − 1 = 1 for TOK1 TOK2). The replacement goes through
`flax.linen.intercept_methods` on the module named `block_{ℓ−1}` (its output) or, for ℓ = 0,
`block_0` (its input), so it needs nothing from model.py beyond the block names of its parameter
tree and a block's `__call__(x, ...) -> x`. The functions take the params first: pass
`state=params`.

Shapes: see docs/method.md "Shape letters"; here N counts pairs, K the subspace dimension k and
C the logits' last axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rareret.errors import is_int, is_number, require
from rareret.lm import inject

VARIABLES = ("X", "Y")
DEFAULT_STEPS = 1000
DEFAULT_LR = 3e-2
DEFAULT_BATCH = 256

HiddenFn = Callable[[Any], jax.Array]
RestFn = Callable[[Any, jax.Array], jax.Array]


# ----------------------------------------------------------------------------- pairs

@dataclasses.dataclass(frozen=True)
class Pairs:
    """Counterfactual pairs for one variable of T_CMP.

    base, source: [N, 2] token rows (TOK1, TOK2), each a row of `split`;
    base_label: [N] the base's LABEL token; label: [N] the counterfactual LABEL token;
    label_index: [N] the counterfactual label as an index into `inject.label_candidates(task)`
      (0 = True token, 1 = False token).
    """

    variable: str
    split: str
    base: np.ndarray
    source: np.ndarray
    base_label: np.ndarray
    label: np.ndarray
    label_index: np.ndarray

    @property
    def differs(self) -> np.ndarray:
        """[N] bool: the counterfactual label differs from the base label."""
        return self.label != self.base_label


def counterfactual_pairs(task: inject.Task, split: str, count: int, variable: str,
                         seed: int = 0) -> Pairs:
    """`count` (base, source, counterfactual label) pairs from one split of a T_CMP task, ⌊count/2⌋
    of them with a counterfactual label that differs from the base label; see the module
    docstring ("Default: pairs")."""
    require(task.spec.kind == "cmp",
            f"counterfactual_pairs: task {task.spec.name!r} is {task.spec.kind!r}; need 'cmp'")
    require(split in ("train", "test"),
            f"counterfactual_pairs: split={split!r} must be 'train' or 'test'")
    require(variable in VARIABLES,
            f"counterfactual_pairs: variable={variable!r} must be one of {VARIABLES}")
    require(is_int(count) and count >= 1,
            f"counterfactual_pairs: count={count!r} must be an integer ≥ 1")
    rows = task.train if split == "train" else task.test
    value = np.full(int(max(task.tokens.max(), task.label_tokens.max())) + 1, -1, np.int64)
    value[task.tokens] = task.values
    first, second = value[rows[:, 0]], value[rows[:, 1]]  # [rows]
    true_token, false_token = task.label_tokens
    base_true = rows[:, 2] == true_token  # [rows]
    # Variable X: O' = [val(source TOK1) < val(base TOK2)]: the source is read through its first
    # operand, compared with the base's second. Variable Y: O' = [val(base TOK1) < val(source
    # TOK2)]. `swapped` are the source operand values, `kept` the base's other operand.
    swapped, kept = (first, second) if variable == "X" else (second, first)
    order = np.argsort(swapped, kind="stable")
    swapped_sorted = swapped[order]
    # For X, sources giving True are those with swapped < kept: order[:n_true]; for Y, those with
    # swapped > kept: order[n_false:] with n_false = #(swapped ≤ kept).
    side = "left" if variable == "X" else "right"
    split_at = np.searchsorted(swapped_sorted, kept, side=side)  # [rows]
    n_rows = len(rows)
    true_lo, true_hi = ((np.zeros(n_rows, np.int64), split_at) if variable == "X"
                        else (split_at, np.full(n_rows, n_rows)))
    false_lo, false_hi = ((split_at, np.full(n_rows, n_rows)) if variable == "X"
                          else (np.zeros(n_rows, np.int64), split_at))

    rng = np.random.default_rng([int(seed), VARIABLES.index(variable), int(split == "test")])
    differ = np.zeros(count, bool)
    differ[:count // 2] = True
    rng.shuffle(differ)
    cf_true_if_differ = ~base_true  # [rows]: the counterfactual label each base would need.
    base_idx = np.empty(count, np.int64)
    want_true = np.empty(count, bool)
    for flag in (True, False):
        want = cf_true_if_differ if flag else base_true  # [rows]
        lo, hi = np.where(want, true_lo, false_lo), np.where(want, true_hi, false_hi)
        feasible = np.flatnonzero(hi > lo)
        slots = np.flatnonzero(differ == flag)
        chosen = feasible[rng.integers(0, len(feasible), size=len(slots))]
        base_idx[slots] = chosen
        want_true[slots] = want[chosen]
    lo = np.where(want_true, true_lo[base_idx], false_lo[base_idx])
    hi = np.where(want_true, true_hi[base_idx], false_hi[base_idx])
    source_idx = order[rng.integers(lo, hi)]
    label = np.where(want_true, true_token, false_token)
    return Pairs(variable, split, rows[base_idx, :2], rows[source_idx, :2], rows[base_idx, 2],
                 label, np.where(want_true, 0, 1))


# ----------------------------------------------------------------------------- DAS

@dataclasses.dataclass(frozen=True)
class DasResult:
    """basis: Q [D, K] with orthonormal columns spanning the learnt subspace (the first K columns
    of R); losses: [steps] the training cross-entropy per step; train_iia: IIA on the training
    pairs after training."""

    basis: np.ndarray
    losses: np.ndarray
    train_iia: float


def orthonormal(w_DxK: jax.Array) -> jax.Array:
    """Q [D, K]: the orthonormal factor of the reduced QR of W (the parametrisation of R)."""
    return jnp.linalg.qr(w_DxK.astype(jnp.float32), mode="reduced")[0]


def intervene(h_base_BxD: jax.Array, h_source_BxD: jax.Array, q_DxK: jax.Array) -> jax.Array:
    """h(b) with its coordinates along Q replaced by h(s)'s: h(b) + Q Qᵀ (h(s) − h(b))."""
    base = h_base_BxD.astype(jnp.float32)
    delta_BxK = (h_source_BxD.astype(jnp.float32) - base) @ q_DxK
    return (base + delta_BxK @ q_DxK.T).astype(h_base_BxD.dtype)


def complete_rotation(basis_DxK, seed: int = 0) -> np.ndarray:
    """A full R ∈ O(D) [D, D] whose first K columns are `basis` (any completion gives the same
    interchange intervention)."""
    q = np.asarray(basis_DxK, np.float64)
    d, k = q.shape
    fill = np.random.default_rng(seed).standard_normal((d, d - k))
    fill -= q @ (q.T @ fill)
    rest = np.linalg.qr(fill)[0] if d > k else np.zeros((d, 0))
    return np.concatenate([q, rest], axis=1)


def _num_pairs(base, source, target) -> int:
    leaves = jax.tree.leaves(base) + jax.tree.leaves(source)
    require(leaves, "das: base and source must hold at least one array")
    n = len(target)
    require(all(leaf.shape[:1] == (n,) for leaf in leaves),
            f"das: every base/source array needs a leading pair axis of length len(target)={n}; "
            f"got shapes {[leaf.shape for leaf in leaves]}")
    require(n >= 1, "das: need at least one pair")
    return n


def _take(tree, idx):
    return jax.tree.map(lambda x: x[idx], tree)


def _call(fn, state, *args):
    """fn(*args), or fn(state, *args) when a state is given."""
    return fn(*args) if state is None else fn(state, *args)


# Jitted once per (function, shapes): `fit` and `iia` on the same functions share compilations.
_hidden_jit = jax.jit(_call, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _rest_jit(rest_fn, state, inputs, h_base_BxD, h_source_BxD, q_DxK):
    return _call(rest_fn, state, inputs, intervene(h_base_BxD, h_source_BxD, q_DxK))


def _hidden_all(hidden_fn: HiddenFn, inputs, n: int, batch: int, state) -> jax.Array:
    """hidden_fn over all N inputs in chunks of `batch`: [N, D]."""
    parts = [_hidden_jit(hidden_fn, state, _take(inputs, slice(i, min(i + batch, n))))
             for i in range(0, n, batch)]
    h = jnp.concatenate(parts, axis=0)
    require(h.ndim == 2, f"das: hidden_fn must return [B, D]; got shape {h.shape}")
    return h


def interchange_logits(hidden_fn: HiddenFn, rest_fn: RestFn, basis_DxK, base, source,
                       batch: int = 1024, state=None) -> np.ndarray:
    """Logits [N, C] of rest_fn on base with the site's coordinates along `basis` taken from
    source."""
    leaves = jax.tree.leaves(base)
    require(leaves, "das: base must hold at least one array")
    n = _num_pairs(base, source, range(leaves[0].shape[0]))
    q = jnp.asarray(basis_DxK, jnp.float32)
    h_base, h_source = (_hidden_all(hidden_fn, x, n, batch, state) for x in (base, source))
    return np.concatenate([np.asarray(_rest_jit(rest_fn, state, _take(base, slice(i, i + batch)),
                                                h_base[i:i + batch], h_source[i:i + batch], q))
                           for i in range(0, n, batch)], axis=0)


def iia(hidden_fn: HiddenFn, rest_fn: RestFn, basis_DxK, base, source, target,
        batch: int = 1024, state=None) -> float:
    """Interchange-intervention accuracy: the fraction of pairs whose intervened argmax is
    `target`."""
    logits = interchange_logits(hidden_fn, rest_fn, basis_DxK, base, source, batch, state)
    return float(np.mean(logits.argmax(-1) == np.asarray(target)))


def fit(hidden_fn: HiddenFn, rest_fn: RestFn, base, source, target, k: int = 1,
        steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, seed: int = 0,
        batch: int = DEFAULT_BATCH, state=None) -> DasResult:
    """Learns a K-dim subspace Q [D, K] of the site by interchange training; see the module
    docstring (interface, parametrisation, budget)."""
    target = np.asarray(target)
    n = _num_pairs(base, source, target)
    require(is_int(k) and k >= 1, f"das.fit: k={k!r} must be an integer ≥ 1")
    require(is_int(steps) and steps >= 1, f"das.fit: steps={steps!r} must be an integer ≥ 1")
    require(is_int(batch) and batch >= 1, f"das.fit: batch={batch!r} must be an integer ≥ 1")
    require(is_number(lr) and lr > 0, f"das.fit: lr={lr!r} must be a positive number")
    require(np.issubdtype(target.dtype, np.integer) and target.shape == (n,),
            f"das.fit: target must be integer [N]; got {target.dtype} {target.shape}")
    h_base = _hidden_all(hidden_fn, base, n, batch, state)  # [N, D]
    h_source = _hidden_all(hidden_fn, source, n, batch, state)
    d = h_base.shape[1]
    require(k <= d, f"das.fit: k={k} exceeds the site's dimension D={d}")

    rng = np.random.default_rng(seed)
    w0 = jnp.asarray(rng.standard_normal((d, k)), jnp.float32)
    b = min(batch, n)
    per_epoch = n // b
    epochs = -(-steps // per_epoch)
    idx_SxB = np.concatenate([rng.permutation(n)[:per_epoch * b].reshape(per_epoch, b)
                              for _ in range(epochs)])[:steps]
    optimizer = optax.adam(lr)

    def loss_fn(w, data, idx):
        h_base, h_source, base, target, state = data
        h = intervene(h_base[idx], h_source[idx], orthonormal(w))
        logits = _call(rest_fn, state, _take(base, idx), h).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, target[idx]).mean()

    @jax.jit
    def train(w, data, idx_SxB):  # Data and state are arguments, not baked-in constants.
        def step(carry, idx):
            w, opt_state = carry
            loss, grad = jax.value_and_grad(loss_fn)(w, data, idx)
            updates, opt_state = optimizer.update(grad, opt_state, w)
            return (optax.apply_updates(w, updates), opt_state), loss

        (w, _), losses = jax.lax.scan(step, (w, optimizer.init(w)), idx_SxB)
        return orthonormal(w), losses

    data = (h_base, h_source, jax.tree.map(jnp.asarray, base), jnp.asarray(target), state)
    basis, losses = train(w0, data, jnp.asarray(idx_SxB))
    basis = np.asarray(basis)
    return DasResult(basis, np.asarray(losses),
                     iia(hidden_fn, rest_fn, basis, base, source, target, batch, state))


# ----------------------------------------------------------------------------- LM site

def lm_site_fns(config, layer: int, position: int, read_position: int = inject.LABEL_POS - 1,
                candidates=None) -> tuple[Callable, Callable]:
    """(hidden_fn(params, tokens), rest_fn(params, tokens, h)) for the OLMo decoder
    (`rareret.lm.model`) at residual-stream index `layer` (0 = embeddings, ℓ = after ℓ blocks)
    and sequence `position`; pass `state=params` to `fit` / `iia` / `interchange_logits` (the
    params then enter the compiled programs as arguments, not as embedded constants). Inputs
    are token rows [B, L'] (T_CMP: TOK1 TOK2). rest_fn returns the logits at `read_position`,
    restricted to the token ids `candidates` if given (e.g. `inject.label_candidates(task)`),
    else the full vocabulary [B, V]."""
    from rareret.lm import model  # Local: das itself is model-agnostic.

    require(is_int(layer) and 0 <= layer <= config.n_layers,
            f"lm_site_fns: layer={layer!r} must be in [0, n_layers={config.n_layers}]")
    require(is_int(position) and position >= 0 and is_int(read_position) and read_position >= 0,
            f"lm_site_fns: position={position!r}, read_position={read_position!r} must be ≥ 0")
    block = f"block_{max(layer - 1, 0)}"
    cand = None if candidates is None else jnp.asarray(np.asarray(candidates))

    def hidden_fn(params, tokens_BxL):
        return model.apply_with_hidden(config, params, tokens_BxL)[1][layer][:, position]

    def rest_fn(params, tokens_BxL, h_BxD):
        def replace(x_BxLxD):
            return x_BxLxD.at[:, position].set(h_BxD.astype(x_BxLxD.dtype))

        def interceptor(next_fun, args, kwargs, context):
            if context.module.name != block or context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if layer == 0:
                return next_fun(replace(args[0]), *args[1:], **kwargs)
            return replace(next_fun(*args, **kwargs))

        with nn.intercept_methods(interceptor):
            logits_BxLxV = model.apply(config, params, tokens_BxL)
        logits_BxV = logits_BxLxV[:, read_position]
        return logits_BxV if cand is None else logits_BxV[:, cand]

    return hidden_fn, rest_fn

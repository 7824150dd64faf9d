"""Everything an LM record measures (docs/method.md §6.8): behaviour, representations, where the
task lives, and gradients. `LmMeasurements` holds the compiled pieces and the instance sets; the
program calls `behaviour` at every record (with the representations at probe steps) and
`gradients` at interference steps, each returning rows for the record arrays of `record_specs`.

What is read, and where (layers: 0 = the embedded tokens, ℓ = the output of block ℓ − 1, i.e.
after ℓ blocks; blocks: 0 … n_layers − 1):
- `task_loss`: LABEL cross-entropy on the train instances injected so far (NaN before the
  first); `task_accuracy`: argmax over the vocabulary = LABEL on the test instances (all of
  them unless `LmTrain.eval_instances` caps both splits); `val_loss`: the next-token loss of the
  held-out sequences.
- `probe_r2` (T_CMP): per layer, the representation of each of the task's 100 tokens alone at
  position 0 (causal attention: it depends on the token only), regressed on val(token)
  (`probes.value_r2`); T_ADD tasks get NaN.
- `fourier_power` / `fourier_modes` (T_ADD): per layer, the representation at position 1 (TOK2,
  where LABEL is predicted) of every test instance, averaged per class (a + b) mod 100, then
  `probes.fourier_power`; T_CMP tasks get NaN.
- `mlp_ablation`: per block, how much the task loss rises when that block's MLP output is
  zeroed, on the first `ABLATION_INSTANCES` (256) train instances injected (NaN before the
  first).
- `reference_loss` (with `LmTrain.reference_templates`): the answer loss of the natural-text
  templates R_cmp and R_add (`rareret.lm.templates`).
- `grad_cosine` / `interference` (`gradients.lm_interference`): on the batch the next step
  trains on, with the first-layer MLP's top neurons of each task's reference gradient.

Shapes (docs/method.md "Shape letters"): B instances, I instance length, D d_model, K tasks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rareret import sharding, store
from rareret.lm import evaluation, gradients, inject, probes, templates
from rareret.lm import model as lm_model

NUM_CLASSES = inject.NUM_VALUES  # T_ADD's output classes (a + b) mod 100.
FREQUENCIES = NUM_CLASSES // 2
ABLATION_INSTANCES = 256  # Injected instances an MLP ablation is measured on (its cost bound).


def record_specs(task_names: list[str], n_layers: int, probes_on: bool,
                 interference_on: bool, templates_on: bool) -> dict[str, store.RecordSpec]:
    """The LM run's record arrays."""
    K, tasks = len(task_names), {"tasks": task_names}
    layers = {"layers": "0 = embedded tokens, l = after l blocks"}
    specs = {
        "step": store.RecordSpec((), np.int64, (), {"description": "training steps taken"}),
        "lm_loss": store.RecordSpec((), np.float32, (), {
            "description": "next-token cross-entropy averaged over the steps since the last "
                           "record (NaN at step 0)"}),
        "val_loss": store.RecordSpec((), np.float32, (), {
            "description": "next-token cross-entropy of the held-out sequences (NaN: none)"}),
        "task_loss": store.RecordSpec((K,), np.float32, ("task",), {
            **tasks, "description": "cross-entropy of LABEL on the train instances injected so "
                                    "far (NaN before the first injection)"}),
        "task_accuracy": store.RecordSpec((K,), np.float32, ("task",), {
            **tasks, "description": "argmax over the vocabulary = LABEL, held-out test "
                                    "instances"}),
    }
    if templates_on:
        specs["reference_loss"] = store.RecordSpec((len(templates.TEMPLATES),), np.float32,
                                                   ("template",), {
            "templates": list(templates.TEMPLATES),
            "description": "next-token cross-entropy of the answers of natural-text templates "
                           "(R_cmp: 'it has increased from x to' y > x; R_add: 'x + y =' x+y)"})
    missing = {"missing": "NaN at records without this measurement, and for tasks of the "
                          "other kind"}
    if probes_on:
        specs.update({
            "probe_r2": store.RecordSpec((K, n_layers + 1), np.float32, ("task", "layer"), {
                **tasks, **layers, **missing, "description": "T_CMP: held-out R² of val(token) "
                "regressed on the token's representation (top-50 principal components)"}),
            "probe_r2_null": store.RecordSpec((K, n_layers + 1), np.float32, ("task", "layer"), {
                **tasks, **layers, **missing, "description": "probe_r2 with shuffled values"}),
            "fourier_power": store.RecordSpec(
                (K, n_layers + 1, FREQUENCIES), np.float32, ("task", "layer", "frequency"), {
                    **tasks, **layers, **missing, "frequencies": "1 … 50",
                    "description": "T_ADD: fraction of the class means' variance per frequency"}),
            "fourier_modes": store.RecordSpec((K, n_layers + 1), np.float32, ("task", "layer"), {
                **tasks, **layers, **missing,
                "description": "T_ADD: frequencies above twice the null level 2/(P-1)"}),
            "mlp_ablation": store.RecordSpec((K, n_layers), np.float32, ("task", "block"), {
                **tasks, "missing": missing["missing"].split(",")[0],
                "description": "rise of the task loss (first 256 injected train instances) "
                               "when this block's MLP output is zeroed"}),
        })
    if interference_on:
        with_text = {"tasks": [*task_names, "text"], "layer": gradients.LAYER}
        specs.update({
            "grad_cosine": store.RecordSpec((K, len(gradients.PARTS)), np.float32,
                                            ("task", "part"), {
                **tasks, "parts": list(gradients.PARTS), **missing,
                "description": "cosine of the batch gradient (all tokens, task tokens, other "
                               "tokens) with the task's reference gradient, on the task's top "
                               "first-layer MLP neurons"}),
            "interference": store.RecordSpec((K + 1, K + 1), np.float32, ("task_i", "task_j"), {
                **with_text, "missing": "NaN at records without this measurement",
                "description": "cosines of the tasks' reference gradients and the batch's text "
                               "gradient, on the union of the tasks' top neurons"}),
        })
    return specs


def _padded(batch: int, *arrays):
    """The arrays cut into batches of `batch` rows, the last padded with zero rows."""
    n = len(arrays[0])
    total = max(-(-n // batch), 1) * batch
    padded = [np.concatenate([a, np.zeros((total - n, *a.shape[1:]), a.dtype)]) for a in arrays]
    return [[a[i:i + batch] for a in padded] for i in range(0, total, batch)]


class LmMeasurements:
    """The compiled measurements of one LM run and the instance sets they read."""

    def __init__(self, spec, config, mesh, tasks: list[inject.Task], eos_id: int,
                 held_out_BxL: np.ndarray, template_batches: dict | None = None):
        self.spec, self.config, self.tasks = spec, config, tasks
        self.replicated = sharding.replicated(mesh)
        self.held_out_BxL, self.template_batches = held_out_BxL, template_batches
        cap = spec.eval_instances  # Train instances: the first `cap` to be injected.
        self.train_sets = [inject.eval_batch(t, eos_id, "train")[0][inject.injection_order(t)]
                           [:cap] for t in tasks]
        self.test_sets = [inject.eval_batch(t, eos_id, "test")[0][:cap] for t in tasks]
        self.test_classes = [_answer_classes(t, test) for t, test in zip(tasks, self.test_sets)]
        self.reference_instances = (np.stack([t.train for t in tasks]).astype(np.int32)
                                    if tasks else None)  # g_r's instances, [K, 5000, 3].
        jit = functools.partial(jax.jit, out_shardings=self.replicated)
        self._label_sums = jit(functools.partial(evaluation.label_sums, config))
        self._ablated_sum = jit(functools.partial(evaluation.label_loss_sum_without_mlp, config))
        self._token_losses = jit(functools.partial(lm_model.token_losses, config))
        self._mean = jit(jnp.mean)
        self._answer_loss = jit(functools.partial(_answer_loss, config))
        self._hidden = jit(lambda params, tokens: jnp.stack(
            lm_model.apply_with_hidden(config, params, tokens)[1]))
        self._label_class_sums = jit(functools.partial(_label_class_sums, config))
        chunks = (reference_chunks(*self.reference_instances.shape[1:],
                                   spec.global_batch * spec.seq_len) if tasks else 1)
        self._interference = jax.jit(functools.partial(
            gradients.lm_interference, config, top_k=spec.interference_top_k, chunks=chunks,
            mesh=mesh),
            static_argnames="task_rows", out_shardings=self.replicated)

    # ------------------------------------------------------------------------------ behaviour

    def _sums(self, fn, params, instances_BxI, weights_B, *static):
        """Adds `fn`'s sums over the instances up to the last weighted one, in batches of
        `eval_batch` rows, or fewer (a power of two, so few shapes compile) when fewer remain;
        padding rows weigh 0."""
        count = int(np.flatnonzero(weights_B)[-1]) + 1 if weights_B.any() else 1
        batch = min(self.spec.eval_batch, 1 << (count - 1).bit_length())
        total = None
        for tokens, weights in _padded(batch, instances_BxI[:count],
                                       weights_B[:count].astype(np.float32)):
            out = fn(params, tokens, tokens[:, inject.LABEL_POS], weights, *static)
            total = out if total is None else jax.tree.map(jnp.add, total, out)
        return total

    def behaviour(self, params, injected: list[int], probes_now: bool = False) -> dict:
        """val_loss, task_loss (on the first `injected[k]` train instances of task k, in
        injection order) and task_accuracy; with `probes_now`, the representation rows too
        (a T_ADD task's class means come from the same forward pass as its accuracy)."""
        losses, accuracies, class_means = [], [], {}
        for k, (task, train, count) in enumerate(zip(self.tasks, self.train_sets, injected)):
            loss_sum, _, count = self._sums(self._label_sums, params, train,
                                            np.arange(len(train)) < count)
            losses.append(evaluation.mean(loss_sum, count))
            if probes_now and task.spec.kind == "add":
                correct, count, class_means[k] = self._accuracy_and_class_means(params, k)
            else:
                _, correct, count = self._sums(self._label_sums, params, self.test_sets[k],
                                               np.ones(len(self.test_sets[k])))
            accuracies.append(evaluation.mean(correct, count))
        val = self._val_loss(params) if len(self.held_out_BxL) else jnp.float32(jnp.nan)
        row = {"val_loss": val, "task_loss": _stack(losses), "task_accuracy": _stack(accuracies)}
        if self.template_batches is not None:
            row["reference_loss"] = _stack([self._answer_loss(params, *self.template_batches[n])
                                            for n in templates.TEMPLATES])
        if probes_now:
            row.update(self._representations(params, injected, class_means))
        return row

    def _val_loss(self, params) -> jax.Array:
        """Mean next-token loss of the held-out sequences, taken `global_batch` sequences at a
        time: a record then holds no more logits than a training step."""
        rows = self.spec.global_batch
        return self._mean(jnp.concatenate([
            self._token_losses(params, self.held_out_BxL[i:i + rows])
            for i in range(0, len(self.held_out_BxL), rows)]))

    # ------------------------------------------------------------------------ representations

    def _representations(self, params, injected: list[int], class_means: dict) -> dict:
        """probe_r2, probe_r2_null, fourier_power, fourier_modes and mlp_ablation rows;
        class_means: {T_ADD task: [layers, classes, D]}."""
        layers, rows = self.config.n_layers + 1, self.no_representations()
        for k, (task, train, count) in enumerate(zip(self.tasks, self.train_sets, injected)):
            if task.spec.kind == "cmp":
                reps_by_layer = np.asarray(self._hidden(params, task.tokens[:, None].astype(
                    np.int32)))[:, :, 0]
                for layer, reps in enumerate(reps_by_layer):
                    rows["probe_r2"][k, layer], rows["probe_r2_null"][k, layer] = (
                        probes.value_r2(reps, task.values))
            else:
                for layer, means in enumerate(class_means[k]):
                    power = probes.fourier_power(means)
                    rows["fourier_power"][k, layer] = power
                    rows["fourier_modes"][k, layer] = probes.fourier_modes(power, NUM_CLASSES)
            if count:  # On the first ABLATION_INSTANCES injected instances.
                subset = train[:min(count, ABLATION_INSTANCES)]
                ones = np.ones(len(subset), bool)
                intact = self._sums(self._label_sums, params, subset, ones)[0]
                for block in range(layers - 1):
                    ablated = self._sums(self._ablated_sum, params, subset, ones, block)
                    rows["mlp_ablation"][k, block] = (ablated - intact) / len(subset)
        return rows

    def no_representations(self) -> dict:
        """NaN rows of the representation arrays, for records without probes."""
        layers, K = self.config.n_layers + 1, len(self.tasks)
        return {"probe_r2": np.full((K, layers), np.nan, np.float32),
                "probe_r2_null": np.full((K, layers), np.nan, np.float32),
                "fourier_power": np.full((K, layers, FREQUENCIES), np.nan, np.float32),
                "fourier_modes": np.full((K, layers), np.nan, np.float32),
                "mlp_ablation": np.full((K, layers - 1), np.nan, np.float32)}

    def _accuracy_and_class_means(self, params, k: int):
        """(Σ correct, count, [layers, classes, D] class means) over task k's test instances:
        the mean residual at position 1 per class (a + b) mod 100."""
        test, classes_B = self.test_sets[k], self.test_classes[k]
        total, counts = None, np.bincount(classes_B, minlength=NUM_CLASSES)
        for tokens, classes, weights in _padded(self.spec.eval_batch, test, classes_B,
                                                np.ones(len(test), np.float32)):
            out = self._label_class_sums(params, tokens, classes, weights)
            total = out if total is None else jax.tree.map(jnp.add, total, out)
        correct, count, sums = total
        with np.errstate(invalid="ignore", divide="ignore"):  # An empty class gives NaN.
            return correct, count, np.asarray(sums, np.float64) / counts[None, :, None]

    # ------------------------------------------------------------------------------ gradients

    def gradients(self, params, tokens_BxL, owner, task_rows: int) -> dict:
        """grad_cosine and interference of the batch `tokens_BxL` (global arrays), whose task
        instances lie in at most `task_rows` rows (one instance per row)."""
        if not self.tasks:
            return {"grad_cosine": np.zeros((0, len(gradients.PARTS)), np.float32),
                    "interference": np.full((1, 1), np.nan, np.float32)}
        out = self._interference(params, tokens_BxL, owner, self.reference_instances,
                                 task_rows=max(task_rows, 1))
        return {"grad_cosine": out.grad_cosine, "interference": out.interference}

    def no_gradients(self) -> dict:
        K = len(self.tasks)
        return {"grad_cosine": np.full((K, len(gradients.PARTS)), np.nan, np.float32),
                "interference": np.full((K + 1, K + 1), np.nan, np.float32)}


def reference_chunks(instances: int, instance_len: int, batch_tokens: int) -> int:
    """Chunks of g_r's instances (`gradients.reference_gradients`): the fewest that divide
    them with no more tokens per chunk than a training batch holds, so a chunk's activations
    and logits take no more memory than the train step's (all 5,000 at once at B·L = 1024
    took 4.6 GB at 20M, 3.5× the run's budget); one when a batch holds them all."""
    return next(c for c in range(1, instances + 1)
                if instances % c == 0 and (instances // c) * instance_len <= batch_tokens
                or c == instances)


def _stack(values) -> jax.Array:
    return jnp.stack(values) if values else jnp.zeros((0,), jnp.float32)


def _answer_loss(config, params, tokens_BxL, weights):
    """Mean cross-entropy over the loss positions weighted 1 (`templates.template_batches`)."""
    return jnp.sum(weights * lm_model.token_losses(config, params, tokens_BxL)) / jnp.sum(weights)


def _answer_classes(task: inject.Task, instances_BxI: np.ndarray) -> np.ndarray:
    """[B] int32: (val(TOK1) + val(TOK2)) mod 100 of each instance."""
    value = dict(zip(task.tokens.tolist(), task.values.tolist()))
    return np.asarray([(value[a] + value[b]) % NUM_CLASSES for a, b in instances_BxI[:, :2]],
                      np.int32)


def _label_class_sums(config, params, tokens_BxI, classes_B, weights_B):
    """(Σ w·[argmax = LABEL], Σ w, [layers, classes, D] Σ w·residual at position 1 per class)
    from one forward pass over TOK1 TOK2."""
    logits_BxLxV, hidden = lm_model.apply_with_hidden(config, params,
                                                      tokens_BxI[:, :inject.LABEL_POS])
    predicted_B = jnp.argmax(logits_BxLxV[:, inject.LABEL_POS - 1], axis=-1)
    correct_B = (predicted_B == tokens_BxI[:, inject.LABEL_POS]).astype(jnp.float32)
    at_label = jnp.stack(hidden)[:, :, inject.LABEL_POS - 1].astype(jnp.float32)
    one_hot = jax.nn.one_hot(classes_B, NUM_CLASSES) * weights_B[:, None]
    return (jnp.sum(weights_B * correct_B), jnp.sum(weights_B),
            jnp.einsum("bc,lbd->lcd", one_hot, at_label))

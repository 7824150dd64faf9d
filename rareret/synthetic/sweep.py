"""The one-jit trainer for the toy: every width × seed × learning rate on one data stream.

`Sweep` is the run's spec; `run_sweep` trains all its models in one compiled program per chunk of
`record_every` steps (a `lax.scan` over steps) and appends exact population metrics to the run's
arrays after each chunk.

Shapes: B batch, D input dim, K tasks, T task dim, M models, C models per width group.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rareret import store
from rareret.errors import is_int, is_number, require
from rareret.progress import Progress
from rareret.synthetic import model, optim, tasks, theory


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What to train: the models (widths × seeds × learning rates) and for how long.

    Attributes:
      widths: encoder widths N, each ≤ TaskMixture.input_dim.
      seeds: model seeds; a model's init depends only on (seed, width).
      learning_rate: peak AdamW rate, one value or several (a per-model axis; no recompiling).
      warmup_steps: linear warm-up before the 1/sqrt(step) decay.
      batch_size: examples per step, shared by all models.
      num_steps: training steps.
      record_every: steps between metric records (records also at step 0 and at the end).
      data_seed: seed of the data stream; batch t is a pure function of (data_seed, t).
      weight_decay: AdamW decoupled weight decay (PyTorch default 0.01).
      tile_size: rows per task tile in the decoder pass (speed only; results do not change).
    """

    widths: Sequence[int] = (2, 4, 8, 16, 32, 64, 128, 256)
    seeds: Sequence[int] = (0,)
    learning_rate: float | Sequence[float] = 1e-3
    warmup_steps: int = 1000
    batch_size: int = 1024
    num_steps: int = 100_000
    record_every: int = 1000
    data_seed: int = 0
    weight_decay: float = 0.01
    tile_size: int = 32

    def __post_init__(self):
        _require_int_list("Sweep.widths", self.widths, minimum=1)
        _require_int_list("Sweep.seeds", self.seeds, minimum=0)
        require(len(self.learning_rates) > 0, "Sweep.learning_rate=[] must name at least one rate")
        for rate in self.learning_rates:
            require(is_number(rate) and 0 < rate < math.inf,
                    f"Sweep.learning_rate={rate!r} must be a finite number > 0")
        for name in ("batch_size", "num_steps", "record_every", "tile_size"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, f"Sweep.{name}={value!r} must be an integer ≥ 1")
        for name in ("warmup_steps", "data_seed"):
            value = getattr(self, name)
            require(is_int(value) and value >= 0, f"Sweep.{name}={value!r} must be an integer ≥ 0")
        require(is_number(self.weight_decay) and 0 <= self.weight_decay < math.inf,
                f"Sweep.weight_decay={self.weight_decay!r} must be a finite number ≥ 0")

    @property
    def learning_rates(self) -> tuple[float, ...]:
        rates = self.learning_rate
        return tuple(rates) if isinstance(rates, (list, tuple)) else (rates,)

    def check_against(self, mixture: tasks.TaskMixture) -> None:
        """Raises ConfigError if the sweep does not fit the mixture."""
        for width in self.widths:
            require(width <= mixture.input_dim,
                    f"Sweep.widths: width {width} exceeds TaskMixture.input_dim="
                    f"{mixture.input_dim}")

    def model_coordinates(self) -> dict[str, np.ndarray]:
        """Per-model coordinates in packed order (width-major, then seed, then learning rate)."""
        grid = list(itertools.product(self.widths, self.seeds, self.learning_rates))
        return {"width": np.array([g[0] for g in grid], np.int64),
                "seed": np.array([g[1] for g in grid], np.int64),
                "learning_rate": np.array([g[2] for g in grid], np.float32)}


def _require_int_list(name: str, values, minimum: int) -> None:
    require(isinstance(values, (list, tuple)) and len(values) > 0,
            f"{name}={values!r} must be a non-empty list of integers")
    for value in values:
        require(is_int(value) and value >= minimum,
                f"{name}: {value!r} must be an integer ≥ {minimum}")
    duplicates = sorted({v for v in values if list(values).count(v) > 1})
    require(not duplicates, f"{name}: duplicate value(s) {duplicates}")


class SweepProgram:
    """The compiled pieces of a sweep: init, a chunk of training steps, and exact metrics."""

    def __init__(self, mixture: tasks.TaskMixture, sweep: Sweep):
        self.mixture, self.sweep = mixture, sweep
        self.layout = model.PackedLayout(
            widths=tuple(sweep.widths), copies=len(sweep.seeds) * len(sweep.learning_rates),
            num_tasks=mixture.num_tasks, task_dim=mixture.task_dim, input_dim=mixture.input_dim)
        self.coords = sweep.model_coordinates()
        self.log_priors_K = jnp.log(jnp.asarray(mixture.prior_array(), jnp.float32))
        self.sqrt_spectra_KxT = jnp.sqrt(jnp.asarray(mixture.spectra(), jnp.float32))
        frequent = theory.frequent_tasks(mixture.prior_array())
        weights_K = np.zeros(mixture.num_tasks)
        weights_K[frequent] = mixture.prior_array()[frequent] * mixture.spectra()[frequent].sum(1)
        self.frequent_weights_K = jnp.asarray(weights_K, jnp.float32)
        self.learning_rate_M = jnp.asarray(self.coords["learning_rate"])
        self.train_chunk = jax.jit(self._train_chunk, static_argnums=2, donate_argnums=(0, 1))
        self.evaluate = jax.jit(self._evaluate)

    def init(self):
        """Params and optimiser state of every model, each from key (seed, width)."""
        keys_M = jnp.stack([jax.random.fold_in(jax.random.key(int(s)), int(w))
                            for w, s in zip(self.coords["width"], self.coords["seed"])])
        params = jax.jit(functools.partial(model.init_params, self.layout))(keys_M)
        return params, jax.jit(self._init_opt)(params)

    def _optimizer(self, learning_rate):
        return optim.paper_adamw(learning_rate, self.sweep.warmup_steps, self.sweep.weight_decay)

    def _per_group(self, fn, *trees):
        """Applies `fn(learning_rate, *leaves)` vmapped over the models of each width group."""
        copies = self.layout.copies
        out = []
        for g, group in enumerate(zip(*trees)):
            rates_C = self.learning_rate_M[g * copies:(g + 1) * copies]
            out.append(jax.vmap(fn)(rates_C, *group))
        return tuple(out)

    def _init_opt(self, params):
        return self._per_group(lambda lr, p: self._optimizer(lr).init(p), params)

    def batch(self, step):
        """Step `step`'s batch: (x_BxD, y_BxT, task_B)."""
        key = tasks.batch_key(self.sweep.data_seed, step)
        x_BxD = tasks.sample_inputs(key, self.sweep.batch_size, self.mixture.input_dim)
        task_B = tasks.sample_tasks(key, self.sweep.batch_size, self.log_priors_K)
        return x_BxD, tasks.targets(x_BxD, task_B, self.sqrt_spectra_KxT), task_B

    def _train_step(self, carry, step):
        params, opt_state = carry
        x_BxD, y_BxT, task_B = self.batch(step)
        tiles = model.task_tiles(task_B, self.mixture.num_tasks, self.sweep.tile_size)

        def total_loss(p):
            losses_M = model.losses(p, x_BxD, y_BxT, tiles)
            return jnp.sum(losses_M), losses_M  # Models are independent: d(sum)/dθ_m = dℓ_m/dθ_m.

        (_, losses_M), grads = jax.value_and_grad(total_loss, has_aux=True)(params)

        def update(lr, g, s, p):
            updates, s = self._optimizer(lr).update(g, s, p)
            return optax.apply_updates(p, updates), s

        updated = self._per_group(update, grads, opt_state, params)
        params = tuple(u[0] for u in updated)
        opt_state = tuple(u[1] for u in updated)
        return (params, opt_state), losses_M

    def _train_chunk(self, params, opt_state, num_steps: int, first_step):
        steps = first_step + jnp.arange(num_steps)
        (params, opt_state), losses_SxM = jax.lax.scan(self._train_step, (params, opt_state), steps)
        return params, opt_state, jnp.mean(losses_SxM, axis=0)

    def _evaluate(self, params):
        task_loss_MxK = model.population_task_loss(params, self.sqrt_spectra_KxT)
        alignment_MxK = model.alignment(params, self.sqrt_spectra_KxT)
        delta_f_M = jnp.sum(self.frequent_weights_K * (1 - alignment_MxK), axis=1)
        return {"task_loss": task_loss_MxK, "alignment": alignment_MxK, "delta_f": delta_f_M}


def record_specs(mixture: tasks.TaskMixture, num_models: int) -> dict[str, store.RecordSpec]:
    K, M = mixture.num_tasks, num_models
    return {
        "step": store.RecordSpec((), np.int64, (), {"description": "training step"}),
        "train_loss": store.RecordSpec(
            (M,), np.float32, ("model",),
            {"description": "batch MSE averaged over the steps since the previous record"}),
        "task_loss": store.RecordSpec(
            (M, K), np.float32, ("model", "task"),
            {"description": "exact population loss / Tr(C_k) (1 = mean predictor)"}),
        "alignment": store.RecordSpec(
            (M, K), np.float32, ("model", "task"),
            {"description": "subspace alignment s_k = Tr(P_W C_k)/Tr(C_k)"}),
        "delta_f": store.RecordSpec(
            (M,), np.float32, ("model",),
            {"description": "residual common-task signal sum_{k in F} pi_k (1 - s_k) Tr(C_k)"}),
    }


def coordinate_arrays(mixture: tasks.TaskMixture, sweep: Sweep) -> dict:
    coords = sweep.model_coordinates()
    return {
        "width": (coords["width"], ["model"], {}),
        "seed": (coords["seed"], ["model"], {}),
        "learning_rate": (coords["learning_rate"], ["model"], {}),
        "prior": (mixture.prior_array().astype(np.float32), ["task"], {}),
        "spectrum": (mixture.spectra().astype(np.float32), ["task", "direction"], {}),
        "frequent": (np.isin(np.arange(mixture.num_tasks),
                             theory.frequent_tasks(mixture.prior_array())),
                     ["task"], {"rule": "smallest top-prior task set with cumulative prior mass >= "
                                      f"{theory.FREQUENT_MASS}"}),
    }


def write_spec(workdir: str, mixture: tasks.TaskMixture, sweep: Sweep) -> None:
    """Saves the specs as JSON so analysis can rebuild them without gin."""
    spec = {"experiment": "synthetic", "mixture": dataclasses.asdict(mixture),
            "sweep": dataclasses.asdict(sweep)}
    with open(os.path.join(workdir, "spec.json"), "w") as f:
        json.dump(spec, f, indent=2, default=list)


def record_steps(sweep: Sweep) -> list[int]:
    """Steps at which metrics are recorded: 0, every `record_every`, and the last step."""
    steps = list(range(0, sweep.num_steps, sweep.record_every)) + [sweep.num_steps]
    return steps


def run_sweep(mixture: tasks.TaskMixture, sweep: Sweep, workdir: str,
              show_progress: bool = True) -> None:
    """Trains every model of `sweep` and streams metrics into `<workdir>/metrics/`."""
    sweep.check_against(mixture)
    program = SweepProgram(mixture, sweep)
    os.makedirs(workdir, exist_ok=True)
    write_spec(workdir, mixture, sweep)
    writer = store.MetricWriter.create(
        os.path.join(workdir, "metrics"), record_specs(mixture, program.layout.num_models),
        coordinate_arrays(mixture, sweep), overwrite=True)
    params, opt_state = program.init()
    steps = record_steps(sweep)
    progress = Progress(sweep.num_steps) if show_progress else None
    train_loss_M = np.full(program.layout.num_models, np.nan, np.float32)
    for index, step in enumerate(steps):
        if index > 0:
            params, opt_state, train_loss_M = program.train_chunk(
                params, opt_state, step - steps[index - 1], steps[index - 1])
        metrics = jax.device_get(program.evaluate(params))
        writer.append({"step": np.array([step]), "train_loss": np.asarray(train_loss_M)[None],
                       **{name: np.asarray(value)[None] for name, value in metrics.items()}})
        if progress:
            progress.update(step, f"mean task loss {np.mean(metrics['task_loss']):.3f}")

"""The synthetic experiment's program: every width × seed × learning rate (× injection gap ×
rare-task multiplier × update rule) in one jitted program, run by `rareret.run.Run`.

`SweepProgram` holds the compiled pieces: a chunk of training steps of any length (one
`fori_loop`, so irregular record schedules never recompile), exact population metrics, and
per-task gradient interference. All models see the same inputs; each (gap, rare multiplier,
update rule) gets its own stream of task ids over those inputs (streams that differ only in
the update rule draw the same ids). The models are split over the devices of a
("replica", "streams", "widths", "copies") mesh (`model_mesh`): their data streams (gap × rare
multiplier), width groups (as lanes of zero-padded widths, `width_lanes`) and copies (seeds ×
learning rates); each device runs the same packed program on its share and draws the shared
batch itself. The specs are in `rareret.synthetic.spec`, the arrays it records in
`rareret.synthetic.records`.

Shapes (docs/method.md "Shape letters"): B batch, D input dim, K tasks, T task dim, M models,
G width groups, C models (copies) per group, S streams, Y injection cycles.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import json
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from rareret import interference
from rareret.blas_threads import single_threaded_blas
from rareret.run import Program
from rareret.synthetic import aggregators, model, optim, records, tasks, theory
from rareret.synthetic.spec import (UPDATE_RULES, Injection, Sweep, TaskMixture,
                                    multiplied_priors, rarest_task)

STREAMS_AXIS = "streams"  # The mesh axis a sweep's data streams are split over.
WIDTHS_AXIS = "widths"  # The mesh axis a sweep's width groups are split over (as lanes).
COPIES_AXIS = "copies"  # The mesh axis a sweep's model copies are split over.
# State entries held per (update rule, width lane) group, [data streams, width shards × copies,
# ...] (`stacked`).
GROUPED_STATE = ("params", "opt_state")
BY_GROUP = PartitionSpec(STREAMS_AXIS, (WIDTHS_AXIS, COPIES_AXIS))  # A grouped state entry.
BY_MODEL = PartitionSpec(STREAMS_AXIS, None, (WIDTHS_AXIS, COPIES_AXIS))  # `_lane_rows`.


class SweepProgram(Program):
    """The compiled pieces of a sweep: init, a chunk of training steps, metrics, interference.

    The state is {"params", "opt_state", "diverged" [M], "train_loss" [M]}: "params" and
    "opt_state" hold one entry per (update rule, width lane) group with the data streams stacked
    in front, [data streams, width shards × copies, ...] (`stacked`), split over the mesh. With
    the widths unsplit (one width shard) a lane is a width and `unstacked` gives the packed
    model's one group per (stream, width); `model_groups` gives them in any split. `train_loss`
    is the mean batch loss of each model over the last `train` call (NaN at step 0). With
    `Sweep.rare_multiplier` set it also holds `rare_rate` [M], the fraction of rare-task
    examples in the batches of that call (NaN at step 0).
    """

    def __init__(self, mixture: TaskMixture, sweep: Sweep,
                 injection: Injection | None = None, devices=None):
        """`devices`: where the sweep's models are split (`model_mesh`; default all)."""
        if injection:
            injection.check_against(mixture, sweep.batch_size)
        sweep.check_against(mixture, injection)
        self.mixture, self.sweep, self.injection = mixture, sweep, injection
        gaps = injection.gaps if injection else (0,)
        # One stream per (gap, rare multiplier, update rule), stream-major groups; streams that
        # differ only in the rule share a data stream (gap, rare multiplier).
        self.data_streams = list(itertools.product(gaps, sweep.rare_multipliers))
        self.streams = [(*data, rule) for data in self.data_streams for rule in sweep.update_rules]
        self.layout = model.PackedLayout(
            widths=tuple(sweep.widths), copies=len(sweep.seeds) * len(sweep.learning_rates),
            num_tasks=mixture.num_tasks, task_dim=mixture.task_dim, input_dim=mixture.input_dim,
            streams=len(self.streams))
        grid = list(itertools.product(self.streams, sweep.widths, sweep.seeds,
                                      sweep.learning_rates))
        self.model_coords = {"gap": np.array([g[0][0] for g in grid], np.int64)}
        self.tracks_rare = sweep.rare_multiplier is not None
        if self.tracks_rare:
            self.model_coords["rare_multiplier"] = np.array([g[0][1] for g in grid], np.float32)
        if sweep.update_rules != ("adamw",):
            self.model_coords["update_rule"] = np.array(
                [UPDATE_RULES.index(g[0][2]) for g in grid], np.int64)
        self.model_coords.update({"width": np.array([g[1] for g in grid], np.int64),
                                  "seed": np.array([g[2] for g in grid], np.int64),
                                  "learning_rate": np.array([g[3] for g in grid], np.float32)})
        self.group_rules = tuple(rule for _, _, rule in self.streams for _ in sweep.widths)
        self.aggregates = any(rule != "adamw" for rule in self.group_rules)
        priors_K = mixture.prior_array()
        self.rare_task = injection.rare(mixture) if injection else rarest_task(priors_K)
        self.frequent_K = np.isin(np.arange(mixture.num_tasks), theory.frequent_tasks(priors_K))
        self.sqrt_spectra_KxT = jnp.sqrt(jnp.asarray(mixture.spectra(), jnp.float32))
        self.maps_KxTxD = model.task_maps(self.sqrt_spectra_KxT, mixture.input_dim)
        trace_K = mixture.spectra().sum(axis=1)
        self.frequent_weights_K = jnp.asarray(priors_K * trace_K * self.frequent_K, jnp.float32)
        self.learning_rate_M = jnp.asarray(self.model_coords["learning_rate"])
        self._streams = self._stream_tables()
        self.checkpoint_every = sweep.checkpoint_every
        self.mesh = model_mesh(len(self.data_streams), self.layout.copies, sweep.widths, devices)
        self.lanes = width_lanes(sweep.widths, self.mesh.shape[WIDTHS_AXIS])
        self.lane_widths = tuple(max(sweep.widths[i] for i in lane if i >= 0)
                                 for lane in self.lanes)
        self._lane_model_M = self._lane_models()
        real = self._lane_model_M >= 0
        self._model_lane_M = np.empty(self.layout.num_models, np.int64)
        self._model_lane_M[self._lane_model_M[real]] = np.flatnonzero(real)
        self.width_M = jnp.asarray(self.model_coords["width"], jnp.float32)
        self._lane_shapes = self._lane_state_shapes()
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

        def placed(state, by_group):  # Parameters and optimiser state split; [M] arrays whole.
            return {name: jax.tree.map(
                lambda _: NamedSharding(self.mesh, by_group) if name in GROUPED_STATE
                else self.replicated, leaves) for name, leaves in state.items()}

        self.state_shardings = placed(jax.eval_shape(self._init_state), BY_GROUP)
        self.saved_shardings = placed(jax.eval_shape(lambda: self._to_saved(self._init_state())),
                                      PartitionSpec(STREAMS_AXIS, COPIES_AXIS))
        self._checkpointed = jax.jit(self._to_saved, out_shardings=self.saved_shardings)
        self._resumed = jax.jit(self._from_saved, out_shardings=self.state_shardings)
        self.train_chunk = jax.jit(self._sharded_train_chunk, donate_argnums=0,
                                   out_shardings=self.state_shardings)
        self.evaluate = jax.jit(self._on_models(SweepProgram._evaluate),
                                out_shardings=self.replicated)
        self.interference = jax.jit(self._on_models(SweepProgram._interference),
                                    out_shardings=self.replicated)

    def _lane_models(self) -> np.ndarray:
        """The model in each slot of the lane layout, flattened [data streams, rules × lanes,
        width shards × copies] (−1: a slot no model fills, all zero units)."""
        rules, copies = len(self.sweep.update_rules), self.layout.copies
        shards = len(self.lanes[0])
        slots = np.full((len(self.data_streams), rules, len(self.lanes), shards, copies), -1)
        for d, r, (j, lane) in itertools.product(range(len(self.data_streams)), range(rules),
                                                 enumerate(self.lanes)):
            for s, w in enumerate(lane):
                if w >= 0:
                    group = (d * rules + r) * len(self.sweep.widths) + w
                    slots[d, r, j, s] = group * copies + np.arange(copies)
        return slots.reshape(-1)

    def _lane_rows(self, a):
        """[M, ...] → the lane layout [data streams, rules × lanes, width shards × copies, ...];
        empty slots hold zeros."""
        real = self._lane_model_M >= 0
        rows = jnp.take(a, np.maximum(self._lane_model_M, 0), axis=0)
        rows = jnp.where(real.reshape(-1, *[1] * (a.ndim - 1)), rows, jnp.zeros_like(rows))
        return rows.reshape(len(self.data_streams), len(self.sweep.update_rules) * len(self.lanes),
                            -1, *a.shape[1:])

    def _model_rows(self, a):
        """`_lane_rows`' inverse: [M, ...] in model order."""
        return jnp.take(a.reshape(-1, *a.shape[3:]), self._model_lane_M, axis=0)

    def model_groups(self, state: dict) -> dict:
        """The grouped state entries (`GROUPED_STATE`) as the unsplit packed model holds them:
        one group per (stream, width), [copies, ...], without padding."""
        copies, widths = self.layout.copies, len(self.sweep.widths)
        position = {w: (j, s) for j, lane in enumerate(self.lanes) for s, w in enumerate(lane)}
        shapes = jax.eval_shape(self._model_state)
        out = {}
        for name in GROUPED_STATE:
            lanes = unstacked(state[name])  # One group per (stream, lane).
            groups = []
            for g, shape in enumerate(shapes[name]):
                stream, w = divmod(g, widths)
                j, s = position[w]
                groups.append(jax.tree.map(
                    lambda a, want, s=s: a[(slice(s * copies, (s + 1) * copies),)
                                           + tuple(slice(0, n) for n in want.shape[1:])],
                    lanes[stream * len(self.lanes) + j], shape))
            out[name] = tuple(groups)
        return out

    def _stream_tables(self):
        """Per stream: task priors, gap and injection counts per cycle (host-computed, exact).

        Without injection a stream draws from the prior with the rare task's share multiplied
        (`multiplied_priors`); with it, the rare task is withheld and each cycle injects
        counts at the rate × multiplier, read exactly as the decimals they print as.
        """
        priors_K = self.mixture.prior_array()
        num_streams = len(self.streams)
        if not self.injection:
            rows = [multiplied_priors(priors_K, self.rare_task, m) for _, m, _ in self.streams]
            return {"priors_SxK": jnp.asarray(np.stack(rows), jnp.float32),
                    "gap_S": jnp.ones(num_streams, jnp.int32),
                    "counts_SxY": jnp.zeros((num_streams, 1), jnp.int32)}
        others_K = priors_K.copy()
        others_K[self.rare_task] = 0.0
        rate = Fraction(str(self.injection.resolved_rate(self.mixture)))
        gaps = [gap for gap, _, _ in self.streams]
        cycles = max(self.sweep.num_steps // min(gaps), 1)
        counts_SxY = np.zeros((num_streams, cycles), np.int32)
        for s, (gap, multiplier, _) in enumerate(self.streams):
            n = self.sweep.num_steps // gap
            counts_SxY[s, :n] = self.injection.counts(
                gap, self.sweep.batch_size, rate * Fraction(str(multiplier)), n)
        return {"priors_SxK": jnp.asarray(np.repeat(others_K[None], num_streams, 0), jnp.float32),
                "gap_S": jnp.asarray(gaps, jnp.int32), "counts_SxY": jnp.asarray(counts_SxY)}

    # ------------------------------------------------------------------ the Program protocol

    def spec(self) -> dict:
        return spec_dict(self.mixture, self.sweep, self.injection)

    def record_steps(self) -> list[int]:
        return self.sweep.record_steps(self.injection)

    def record_specs(self):
        return records.record_specs(self)

    def coords(self):
        return records.coordinate_arrays(self)

    def running(self):
        return single_threaded_blas()

    def summary(self, row) -> str:
        return f"mean task loss {np.mean(row['task_loss']):.3f}"

    def finish(self, writer) -> None:
        if self.injection:
            records.write_retention(writer, self)

    def init(self) -> dict:
        """The state of every model: params, optimiser state (each from key (seed, width)),
        the `diverged` flags [M] and `train_loss` [M] (NaN)."""
        # Computed whole on one device of each process (every process gets the same values),
        # then placed: XLA's CPU runtime can deadlock when several devices run LAPACK at once.
        local = jax.device_get(jax.jit(self._init_state, out_shardings=SingleDeviceSharding(
            jax.local_devices()[0]))())
        return jax.tree.map(
            lambda value, sharding: jax.make_array_from_callback(
                value.shape, sharding, lambda index: value[index]), local, self.state_shardings)

    def _model_params(self):
        """Every model's params, one group per (stream, width), each from key (seed, width)."""
        keys_M = jnp.stack([jax.random.fold_in(jax.random.key(int(s)), int(w))
                            for w, s in zip(self.model_coords["width"],
                                            self.model_coords["seed"])])
        return model.init_params(self.layout, keys_M)

    def _model_state(self) -> dict:
        """`_model_params` and their optimiser state, as the unsplit packed model holds them."""
        params = self._model_params()
        return {"params": params, "opt_state": self._init_opt(params)}

    def _init_state(self) -> dict:
        state = self._model_state()
        state = {**{name: stacked(self._as_lanes(name, state[name]), len(self.data_streams))
                    for name in GROUPED_STATE},
                 "diverged": jnp.zeros(self.layout.num_models, bool),
                 "train_loss": jnp.full(self.layout.num_models, jnp.nan, jnp.float32)}
        if self.tracks_rare:
            state["rare_rate"] = jnp.full(self.layout.num_models, jnp.nan, jnp.float32)
        return state

    def _as_lanes(self, name: str, groups: tuple) -> tuple:
        """Grouped state entry `name` per (stream, width), [copies, ...] (`_model_state`) → per
        (stream, lane), [width shards × copies, ...]: each lane's widths zero-padded to its
        widest, empty slots all zeros. Zero units stay zero (their gradients are zero, and so
        AdamW's moments and weight decay) and change no metric given the true widths."""
        copies, rules = self.layout.copies, len(self.sweep.update_rules)

        def slot(want, group):  # One width shard's copies in the lane's shapes.
            if group is None:
                return jax.tree.map(lambda t: jnp.zeros((copies, *t.shape[1:]), t.dtype), want)
            return jax.tree.map(lambda t, a: jnp.pad(a, [(0, n - m) for n, m in zip(
                (copies, *t.shape[1:]), a.shape)]), want, group)

        out = []
        for stream, (j, lane) in itertools.product(range(len(self.streams)),
                                                   enumerate(self.lanes)):
            want = self._lane_shapes[name][stream % rules * len(self.lanes) + j]
            slots = [slot(want, groups[stream * len(self.sweep.widths) + w] if w >= 0 else None)
                     for w in lane]
            out.append(jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *slots))
        return tuple(out)

    def _lane_state_shapes(self) -> dict:
        """The grouped state entries' shapes per (update rule, lane) group."""
        slots = len(self.lanes[0]) * self.layout.copies
        rates = np.zeros(len(self.sweep.update_rules) * len(self.lanes) * slots, np.float32)
        in_lanes = self._narrowed(1, slots, rates, None)

        def state():
            keys = jax.random.split(jax.random.key(0), in_lanes.layout.num_models)
            params = model.init_params(in_lanes.layout, keys)
            return {"params": params, "opt_state": in_lanes._init_opt(params)}

        return jax.eval_shape(state)

    def _to_saved(self, state: dict) -> dict:
        """The state as checkpoints hold it (`checkpointed`)."""
        groups = self.model_groups(state)
        return {**state, **{name: stacked(groups[name], len(self.data_streams))
                            for name in GROUPED_STATE}}

    def _from_saved(self, saved: dict) -> dict:
        return {**saved, **{name: stacked(self._as_lanes(name, unstacked(saved[name])),
                                          len(self.data_streams)) for name in GROUPED_STATE}}

    def checkpointed(self, state: dict) -> dict:
        """The state with params and optimiser state per (update rule, width) group, [data
        streams, copies, ...], unpadded whatever the split: a run resumes on any devices."""
        return self._checkpointed(state)

    def resumed(self, saved: dict) -> dict:
        return self._resumed(saved)

    def abstract_state(self) -> dict:
        return jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            jax.eval_shape(lambda: self._to_saved(self._init_state())), self.saved_shardings)

    # ------------------------------------------------------------------ models over devices

    @property
    def stream_M(self) -> np.ndarray:
        """Stream of each model, [M]."""
        return np.repeat(np.arange(len(self.streams)), len(self.layout.widths) * self.layout.copies)

    def _map_models(self, fn, grouped: dict, per_model: dict, *args):
        """`fn(shard, grouped, per_model, *args)` → (grouped, per_model) on each device's models.

        `grouped`: name → a state entry held per (rule, width lane) group (`stacked`), split
        over the mesh; `per_model`: name → [M, ...] arrays, each device given its models' rows
        (`_lane_rows`); `args`: the same on every device. `fn` gets them as `shard` (this
        program narrowed to the device's block of the lane layout, `_narrowed`) holds them: one
        group per (stream, lane) and a row per model slot. Every device draws the whole shared
        batch itself.
        """
        def local(grouped, per_model, rates, widths, *args):
            local_streams, _, local_copies = rates.shape
            shard = self._narrowed(local_streams, local_copies, rates.reshape(-1),
                                   widths.reshape(-1),
                                   jax.lax.axis_index(STREAMS_AXIS) * local_streams)
            grouped, rows = fn(shard, {name: unstacked(v) for name, v in grouped.items()},
                               jax.tree.map(lambda a: a.reshape(-1, *a.shape[3:]), per_model),
                               *args)
            return ({name: stacked(v, local_streams) for name, v in grouped.items()},
                    jax.tree.map(lambda a: a.reshape(local_streams, -1, local_copies,
                                                     *a.shape[1:]), rows))

        in_specs = (BY_GROUP, BY_MODEL, BY_MODEL, BY_MODEL) + (PartitionSpec(),) * len(args)
        grouped, per_model = jax.shard_map(
            local, mesh=self.mesh, in_specs=in_specs, out_specs=(BY_GROUP, BY_MODEL),
            check_vma=False)(
            grouped, jax.tree.map(self._lane_rows, per_model),
            self._lane_rows(self.learning_rate_M), self._lane_rows(self.width_M), *args)
        return grouped, jax.tree.map(self._model_rows, per_model)

    def _narrowed(self, data_streams: int, copies: int, learning_rate_M, width_M,
                  first_stream=0):
        """This program on a block of the lane layout (one device's, in `_map_models`):
        `data_streams` data streams from `first_stream`, with their every update rule, one group
        per (stream, lane) of `copies` model slots, whose learning rates and true widths are
        `learning_rate_M` and `width_M` [slots] (0 for an empty slot).

        Its `streams` name only the update rules: its gaps and multipliers are known when it
        runs, in its rows of the stream tables.
        """
        shard = copy.copy(self)
        rules = self.sweep.update_rules
        streams = data_streams * len(rules)
        shard.streams = [(None, None, rule) for _ in range(data_streams) for rule in rules]
        shard.group_rules = tuple(rule for _, _, rule in shard.streams for _ in self.lanes)
        shard.layout = dataclasses.replace(self.layout, widths=self.lane_widths, streams=streams,
                                           copies=copies)
        shard._streams = {name: jax.lax.dynamic_slice_in_dim(table, first_stream * len(rules),
                                                             streams)
                          for name, table in self._streams.items()}
        shard.learning_rate_M, shard.width_M = learning_rate_M, width_M
        return shard

    def _sharded_train_chunk(self, state, num_steps, first_step):
        """`_train_chunk` on each device's models."""
        grouped = {name: state[name] for name in GROUPED_STATE}
        per_model = {name: value for name, value in state.items() if name not in GROUPED_STATE}

        def chunk(shard, grouped, per_model, num_steps, first_step):
            out = shard._train_chunk({**grouped, **per_model}, num_steps, first_step)
            return {n: out[n] for n in grouped}, {n: out[n] for n in per_model}

        grouped, per_model = self._map_models(chunk, grouped, per_model, num_steps, first_step)
        return {**grouped, **per_model}

    def _on_models(self, method):
        """`method(program, params, *args)` → per-model arrays, run on each device's models."""
        def run(params, *args):
            def local(shard, grouped, _, *args):
                return {}, method(shard, grouped["params"], *args)
            return self._map_models(local, {"params": params}, {}, *args)[1]
        return run

    def train(self, state: dict, start: int, stop: int) -> dict:
        """The state after steps start … stop − 1 (`train_loss`: their mean loss per model)."""
        return self.train_chunk(state, stop - start, start)

    def _optimizer(self, rule, learning_rate) -> optim.Optimizer:
        """The paper's AdamW; under an aggregating rule, after combining per-task encoder
        gradients (PCGrad's order seeded by `Sweep.data_seed`)."""
        rules = {"adamw": lambda: None,
                 "pcgrad": lambda: aggregators.pcgrad(self.sweep.data_seed),
                 "cagrad": aggregators.cagrad}
        return optim.Optimizer(learning_rate, self.sweep.warmup_steps, self.sweep.weight_decay,
                               rules[rule]())

    def _per_group(self, fn, *trees):
        """Applies `fn(rule, learning_rate, *leaves)` vmapped over the models of each group."""
        copies = self.layout.copies
        out = []
        for g, group in enumerate(zip(*trees)):
            rates_C = self.learning_rate_M[g * copies:(g + 1) * copies]
            out.append(jax.vmap(functools.partial(fn, self.group_rules[g]))(rates_C, *group))
        return tuple(out)

    def _init_opt(self, params):
        return self._per_group(lambda rule, lr, p: self._optimizer(rule, lr).init(p), params)

    def _injected(self, step):
        """Fresh rare examples injected into step `step`'s batch of each stream, [S]."""
        t = self._streams
        cycle = jnp.maximum(step, 0) // t["gap_S"]
        injecting = (step >= 0) & ((step % t["gap_S"]) == t["gap_S"] - 1)
        count = t["counts_SxY"][jnp.arange(t["gap_S"].shape[0]),
                                jnp.minimum(cycle, t["counts_SxY"].shape[1] - 1)]
        return jnp.where(injecting, count, 0)

    def rare_counts(self, step):
        """Rare examples in step `step`'s batch of each stream, [S]: the injection's fresh ones,
        or under `Injection.replay_after` = k those of step − k shown again."""
        if not self.injection:
            return jnp.zeros(len(self.streams), jnp.int32)
        fresh = self._injected(step)
        if self.injection.replay_after:
            fresh += self._injected(step - self.injection.replay_after)
        return fresh

    def batch(self, step):
        """Step `step`'s batch: (x_BxD, y_SxBxT, task_SxB), one row of tasks per stream."""
        key = tasks.batch_key(self.sweep.data_seed, step)
        x_BxD = tasks.sample_inputs(key, self.sweep.batch_size, self.mixture.input_dim)
        task_SxB = jax.vmap(lambda priors_K, count: tasks.stream_tasks(
            key, self.sweep.batch_size, priors_K, self.rare_task, count))(
            self._streams["priors_SxK"], self.rare_counts(step))
        if self.injection and self.injection.replay_after:
            x_BxD = self._replayed_inputs(step, x_BxD, task_SxB[0])
        return x_BxD, tasks.stream_targets(x_BxD, task_SxB, self.sqrt_spectra_KxT), task_SxB

    def _replayed_inputs(self, step, x_BxD, task_B):
        """At a replay step, the rare rows' inputs are those of the rare rows of step − k,
        regenerated from that step's key (every stream holds the same rows: one gap, one
        multiplier), so the replayed rows equal the originals exactly."""
        before = step - self.injection.replay_after
        count = self._injected(before)[0]

        def replay():
            key = tasks.batch_key(self.sweep.data_seed, jnp.maximum(before, 0))
            old_x_BxD = tasks.sample_inputs(key, self.sweep.batch_size, self.mixture.input_dim)
            old_task_B = tasks.stream_tasks(key, self.sweep.batch_size,
                                            self._streams["priors_SxK"][0], self.rare_task, count)
            # The rare rows are one block in both sorted batches: shift one onto the other.
            shift = (jnp.searchsorted(old_task_B, self.rare_task)
                     - jnp.searchsorted(task_B, self.rare_task))
            rows_B = jnp.clip(jnp.arange(task_B.shape[0]) + shift, 0, task_B.shape[0] - 1)
            return jnp.where((task_B == self.rare_task)[:, None], old_x_BxD[rows_B], x_BxD)

        return jax.lax.cond(count > 0, replay, lambda: x_BxD)

    def _tiled_batch(self, step):
        """Step `step`'s inputs and task ids with each stream's task tiles: (x_BxD, task_SxB,
        tiles), and with `Sweep.rare_multiplier` set each stream's rare-task examples [S]. The
        targets are left to the step that trains on it (`_train_step`)."""
        with jax.named_scope("batch"):
            x_BxD, _, task_SxB = self.batch(step)
            tiles = jax.vmap(lambda task_B: model.task_tiles(
                task_B, self.mixture.num_tasks, self.sweep.tile_size))(task_SxB)
        if self.tracks_rare:
            return x_BxD, task_SxB, tiles, jnp.sum(task_SxB == self.rare_task, axis=1)
        return x_BxD, task_SxB, tiles

    def _train_step(self, step, carry):
        state, sums, batch = carry
        # The next batch does not depend on this step, so XLA's CPU runtime generates it while
        # this step's small decoder ops run.
        upcoming = self._tiled_batch(step + 1)
        x_BxD, task_SxB, tiles = batch[:3]
        # Targets read the inputs carried in from the last step: taken where x is drawn, XLA
        # fuses the draw into their gather too, splitting it into passes that hash x twice.
        with jax.named_scope("batch"):
            y_SxBxT = tasks.stream_targets(x_BxD, task_SxB, self.sqrt_spectra_KxT)
        losses_M, grads = self.gradients(state, x_BxD, y_SxBxT, tiles)
        with jax.named_scope("optimizer"):
            state = self._apply_updates(state, losses_M, grads)
        return state, tuple(s + b for s, b in zip(sums, (losses_M, *batch[3:]))), upcoming

    def gradients(self, state, x_BxD, y_SxBxT, tiles):
        """Each model's batch loss [M] and what its optimiser takes: the gradients, with the
        encoder's as per-task contributions [C, K, N, D] in groups under an aggregating rule
        (`model.task_encoder_gradients`). Diverged models add nothing."""
        params, diverged_M = state["params"], state["diverged"]
        if not self.aggregates:
            def total_loss(p):
                losses_M = model.losses(p, x_BxD, y_SxBxT, tiles)
                # Models are independent: d(sum)/dθ_m = dℓ_m/dθ_m.
                return jnp.sum(jnp.where(diverged_M, 0.0, losses_M)), losses_M

            (_, losses_M), grads = jax.value_and_grad(total_loss, has_aux=True)(params)
            return losses_M, grads
        with jax.named_scope("encoder"):
            hidden = model.encode(x_BxD, tuple(p["encoder"] for p in params))

        def decoded_loss(hidden, decoders):
            packed = tuple({**p, "decoders": d} for p, d in zip(params, decoders))
            with jax.named_scope("decoder"):
                losses_M = model.decoded_losses(packed, hidden, y_SxBxT, tiles)
            return jnp.sum(jnp.where(diverged_M, 0.0, losses_M)), losses_M

        (_, losses_M), (grad_hiddens, grad_decoders) = jax.value_and_grad(
            decoded_loss, argnums=(0, 1), has_aux=True)(
            hidden, tuple(p["decoders"] for p in params))
        grads = []
        for g, (p, grad_hidden) in enumerate(zip(params, grad_hiddens)):
            copies = p["encoder"].shape[0]
            with jax.named_scope("encoder"):
                if self.group_rules[g] == "adamw":
                    encoder = (grad_hidden.T @ x_BxD).reshape(p["encoder"].shape)
                else:
                    stream_tiles = jax.tree.map(lambda a: a[g // len(self.layout.widths)], tiles)
                    encoder = model.task_encoder_gradients(
                        grad_hidden, x_BxD, stream_tiles, self.mixture.num_tasks, copies)
            grads.append({"encoder": encoder, "decoders": grad_decoders[g]})
        return losses_M, tuple(grads)

    def _apply_updates(self, state, losses_M, grads):
        """Each model's optimiser step (`optim.Optimizer.step`); a model whose loss or gradient
        is non-finite is frozen as it was before the step and flagged for good."""
        frozen_GxC = (state["diverged"] | ~jnp.isfinite(losses_M)).reshape(
            self.layout.num_groups, self.layout.copies)

        def step(rule, lr, frozen, g, s, p):
            return self._optimizer(rule, lr).step(g, s, p, frozen)

        stepped = self._per_group(step, frozen_GxC, grads, state["opt_state"], state["params"])
        params, opt_state, frozen_C = zip(*stepped)
        return {**state, "params": params, "opt_state": opt_state,
                "diverged": jnp.concatenate(frozen_C)}

    def _train_chunk(self, state, num_steps, first_step):
        """`num_steps` steps from `first_step`; `train_loss` becomes their mean loss [M].

        A model is frozen at its state before the first step whose batch loss or gradient (the
        norm AdamW clips by) is non-finite, and flagged in `state["diverged"]`; the others are
        unaffected. That is its last finite state unless an update overflowed float32 (a
        learning rate near 1e38: `optim.Optimizer.step`).
        """
        sums = (jnp.zeros(self.layout.num_models, jnp.float32),)  # Loss, [rare examples].
        if self.tracks_rare:
            sums += (jnp.zeros(len(self.streams), jnp.int32),)
        state, sums, _ = jax.lax.fori_loop(
            first_step, first_step + num_steps, self._train_step,
            (state, sums, self._tiled_batch(first_step)))
        state = {**state, "train_loss": sums[0] / num_steps}
        if self.tracks_rare:
            state["rare_rate"] = sums[1][self.stream_M] / (self.sweep.batch_size * num_steps)
        return state

    def record(self, state: dict, step: int) -> dict:
        """One metric record of `state` (device arrays; nothing aliases the donated state)."""
        row = {"step": np.int64(step), "train_loss": jnp.copy(state["train_loss"]),
               "diverged": jnp.copy(state["diverged"]), **self.evaluate(state["params"])}
        if self.tracks_rare:
            row["rare_rate"] = jnp.copy(state["rare_rate"])
        if self.sweep.interference_every:
            row.update(self.interference(state["params"], step)
                       if step % self.sweep.interference_every == 0 else self._no_interference)
        return row

    @functools.cached_property
    def _no_interference(self) -> dict:
        """NaN interference rows, for records between interference steps."""
        M, K = self.layout.num_models, self.mixture.num_tasks
        return {"interference": np.full((M, K, K), np.nan, np.float32),
                "interference_gram": np.full((M, K, K), np.nan, np.float32),
                "grad_norm": np.full((M, K), np.nan, np.float32),
                "rare_frequent_cosine": np.full((M,), np.nan, np.float32)}

    def _evaluate(self, params):
        task_loss_MxK = model.population_task_loss(params, self.sqrt_spectra_KxT)
        alignment_MxK, misaligned_MxK = model.subspace_alignment(params, self.sqrt_spectra_KxT,
                                                                 self.width_M)
        delta_f_M = jnp.sum(self.frequent_weights_K * misaligned_MxK, axis=1)
        return {"task_loss": task_loss_MxK, "alignment": alignment_MxK, "delta_f": delta_f_M}

    def _interference(self, params, step):
        """Task × task interference of every model's encoder gradients (see `interference`)."""
        stats = []
        if self.sweep.interference_mode == "population":
            def one(encoder_NxD, decoders_KxTxN):
                grads_KxNxD = model.population_task_gradients(
                    encoder_NxD, decoders_KxTxN, self.maps_KxTxD)
                return interference.gram_stats(grads_KxNxD.reshape(grads_KxNxD.shape[0], -1))
            stats = [jax.vmap(one)(p["encoder"], p["decoders"]) for p in params]
        else:
            x_BxD, y_SxBxT, task_SxB = self.batch(step)
            per_stream = len(params) // self.layout.streams
            for g, p in enumerate(params):
                y_BxT, task_B = y_SxBxT[g // per_stream], task_SxB[g // per_stream]

                def one(encoder_NxD, decoders_KxTxN, y_BxT=y_BxT, task_B=task_B):
                    result = interference.interference(
                        lambda groups: model.example_losses(groups[0], decoders_KxTxN, x_BxD,
                                                            y_BxT, task_B),
                        (encoder_NxD,), task_B, self.mixture.num_tasks)
                    return result.gram[0], result.cosine[0], result.norm[0]
                stats.append(jax.vmap(one)(p["encoder"], p["decoders"]))
        gram_MxKxK, cosine_MxKxK, norm_MxK = (jnp.concatenate(parts) for parts in zip(*stats))
        rare_K = jax.nn.one_hot(self.rare_task, self.mixture.num_tasks)
        frequent_K = jnp.asarray(self.mixture.prior_array() * self.frequent_K, jnp.float32)
        rare_frequent_M = jax.vmap(interference.weighted_cosine, in_axes=(0, None, None))(
            gram_MxKxK, rare_K, frequent_K)
        return {"interference": cosine_MxKxK, "interference_gram": gram_MxKxK,
                "grad_norm": norm_MxK, "rare_frequent_cosine": rare_frequent_M}


def stacked(groups: tuple, data_streams: int) -> tuple:
    """One group per (stream, width), stream-major (`model.PackedLayout`), restacked as one
    group per (update rule, width) with the data streams in front: [data streams, copies, ...].
    Group (data stream d, rule r, width w) is entry r·widths + w, row d."""
    per_data_stream = len(groups) // data_streams
    return tuple(jax.tree.map(lambda *rows: jnp.stack(rows), *groups[g::per_data_stream])
                 for g in range(per_data_stream))


def unstacked(grouped: tuple) -> tuple:
    """`stacked`'s inverse: a state entry as the packed model holds it, one group per (stream,
    width) with the copies first (`model.PackedLayout`)."""
    data_streams = jax.tree.leaves(grouped)[0].shape[0]
    return tuple(jax.tree.map(lambda a: a[d], group)
                 for d in range(data_streams) for group in grouped)


def model_mesh(data_streams: int, copies: int, widths, devices=None) -> Mesh:
    """The ("replica", "streams", "widths", "copies") mesh a sweep runs on: its `data_streams`
    (gap × rare multiplier) over "streams", its `widths` as lanes over "widths"
    (`width_lanes`), the `copies` of each of its groups over "copies".

    The split is the one that leaves the fewest model rows (copies × padded width) per device
    with at most all `devices` (default: every device of every process); among equals, the one
    with the fewest width shards (padding) and then the most stream shards (a device then draws
    fewer task ids and targets). It takes the same number of devices from each process, so
    every process of a multi-process run holds part of the sweep; when the processes cannot
    share the models evenly, each process holds the whole sweep (split over its own devices)
    and the processes are replicas. Devices outside the mesh stay idle. Results do not depend
    on the split: each device draws the shared batch from the same (data seed, step), and zero
    units pad the widths (`model.padded`).
    """
    grid = model_device_grid(data_streams, copies, widths,
                             jax.devices() if devices is None else devices)
    return Mesh(np.array(grid), ("replica", STREAMS_AXIS, WIDTHS_AXIS, COPIES_AXIS))


def width_lanes(widths, shards: int) -> list[tuple[int, ...]]:
    """The sweep's width groups (indices into `widths`) in lanes of `shards`, one per width
    shard, −1 where a lane has fewer: the widths sorted widest first, cut into lanes (which
    minimises the sum of the lanes' widest widths, what a device computes), ordered by their
    first width in `widths` (one shard: `widths`' order)."""
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    lanes = [tuple(order[i:i + shards]) for i in range(0, len(order), shards)]
    return sorted((lane + (-1,) * (shards - len(lane)) for lane in lanes),
                  key=lambda lane: min(i for i in lane if i >= 0))


def lane_rows(widths, shards: int) -> int:
    """Rows (padded width) of one copy of every lane on a device, `widths` in `shards`."""
    return sum(max(widths[i] for i in lane if i >= 0) for lane in width_lanes(widths, shards))


def model_device_grid(data_streams: int, copies: int, widths, devices) -> list:
    """`model_mesh`'s devices as a [replicas, stream shards, width shards, copy shards] grid."""
    by_process: dict[int, list] = {}
    for device in devices:
        by_process.setdefault(device.process_index, []).append(device)
    processes, per_process = len(by_process), min(len(d) for d in by_process.values())
    lists = [by_process[p] for p in sorted(by_process)]

    def split(most: int, multiple_of: int):
        """(stream, width, copy) shards of ≤ `most` devices: the fewest rows per device."""
        splits = [(s, w, c) for s in range(1, data_streams + 1)
                  for w in range(1, len(widths) + 1) for c in range(1, copies + 1)
                  if data_streams % s == 0 and copies % c == 0 and s * w * c <= most
                  and s * w * c % multiple_of == 0]
        def rows(s, w, c):
            return (data_streams // s) * (copies // c) * lane_rows(widths, w)

        return min(splits, key=lambda swc: (rows(*swc), swc[1], -swc[0]), default=None)

    def grid(flat: list, shape) -> list:
        return np.array(flat[:math.prod(shape)], dtype=object).reshape(shape).tolist()

    shared = split(processes * per_process, processes)
    if shared:
        per = math.prod(shared) // processes
        return [grid([d for devices_p in lists for d in devices_p[:per]], shared)]
    return [grid(devices_p, split(per_process, 1)) for devices_p in lists]


def spec_dict(mixture: TaskMixture, sweep: Sweep, injection: Injection | None) -> dict:
    """The run's specs as plain JSON values (what `spec.json` holds)."""
    schedule = dataclasses.asdict(injection) if injection else None
    if schedule and not schedule["replay_after"]:  # Runs from before the knob still resume.
        del schedule["replay_after"]
    spec = {"experiment": "synthetic", "mixture": dataclasses.asdict(mixture),
            "sweep": dataclasses.asdict(sweep), "injection": schedule}
    return json.loads(json.dumps(spec, default=list))

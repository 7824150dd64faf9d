"""The language-model experiment's program: an OLMo-style decoder trained on packed text with
rare synthetic tasks injected at controlled frequencies (docs/method.md §6), run by
`rareret.run.Run`.

Per step: the grain iterator yields this process's rows of the global batch, the `Injector` writes
task instances over the first tokens of chosen rows, the rows become one global array sharded
over (data, fsdp), and a jitted step (parameters and optimiser state sharded by the logical-axis
rules of `rareret.sharding`, state donated) applies AdamW with warm-up + cosine decay.

Records (every `record_every` steps and at the end): `lm_loss` [record] (mean training loss over
the steps since the previous record), `task_loss` [record, task] (cross-entropy of LABEL on the
task's injected train instances) and `task_accuracy` [record, task] (full-vocabulary argmax =
LABEL on its held-out test instances). The run's checkpoints hold the train state and the grain
iterator's state.

Shapes (docs/method.md "Shape letters"): B global batch, b local batch, L sequence, V vocab,
I instance length.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers

from rareret import host_malloc, processes, sharding
from rareret.blas_threads import single_threaded_blas
from rareret.errors import ConfigError, require
from rareret.lm import corpus, data, fsdp, gradients, inject, ladder, measurements
from rareret.lm import pretokenize, templates
from rareret.lm import model as lm_model
from rareret.lm.optim import optimizer
from rareret.lm.spec import LmTrain
from rareret.run import Program

VOCAB_MULTIPLE = 128  # Pad the model vocabulary (OLMo: 50,280 → 50,304).
_SETTLE_S = (0.01, 0.05)  # Pauses before giving freed pages back again (`_release_after`).
XLA_CPU_MEMORY_SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
# The program's files in the workdir: the embedded corpus, a trained tokenizer, cached tokens.
DATA_DIR, TOKENIZER_FILE, TOKENS_DIR = "data", "tokenizer.json", "tokens"


@dataclasses.dataclass
class UserData:
    """The run's data as read and validated before the workdir is touched: token files
    (memory-mapped; also text already tokenised into `LmTrain.token_cache`) and their global
    order, or the path of a text corpus (checked, to be tokenised into the workdir), neither
    for the embedded default corpus; and the user's tokenizer, if `LmTrain.tokenizer` names
    one."""

    tokens: data.TokenCorpus | None = None
    text: str | None = None
    tokenizer: tokenizers.Tokenizer | None = None
    order: np.ndarray | None = None


def read_inputs(spec: LmTrain) -> UserData:
    """Reads and validates everything the run will read (mesh, tokenizer, data), so bad input
    fails before the workdir is touched; the data is kept, so it is read only once.

    Every process of a multi-process run calls it: when one process's input is bad (say, a
    file missing on its host), all of them raise (`processes.agree`).
    """
    device_count = jax.device_count()  # Starts the backend: every process reaches the check.
    inputs = processes.agree(lambda: _read_inputs(spec, device_count))
    if inputs.text is not None and inputs.tokenizer is not None and spec.token_cache:
        # A given cache folder may be written before the claim: process 0 tokenises (checking
        # the text as it goes) unless it is cached already; the others wait, then read it.
        processes.agree(lambda: processes.is_writer() and pretokenize.cached(
            spec.data, spec.tokenizer, spec.token_cache))
        tokens = processes.agree(lambda: data.TokenCorpus.from_tokenized(
            pretokenize.cache_path(spec.data, spec.tokenizer, spec.token_cache)))
        inputs = UserData(tokens=tokens, tokenizer=inputs.tokenizer)
    return inputs


def _read_inputs(spec: LmTrain, device_count: int) -> UserData:
    spec.mesh.resolve(device_count)
    tokenizer = data.load_tokenizer(spec.tokenizer) if spec.tokenizer else None
    if spec.data != "default":
        require(os.path.exists(spec.data), f"LmTrain.data={spec.data}: no such file or directory")
    token_data = spec.data != "default" and is_token_data(spec.data)
    require(spec.global_indices is None or token_data,
            f"LmTrain.global_indices={spec.global_indices} needs token data; LmTrain.data="
            f"{spec.data} is text")
    if spec.data == "default":
        return UserData(tokenizer=tokenizer)
    if token_data:
        tokens = data.TokenCorpus.from_token_files(spec.data, spec.vocab_size, spec.eos_id,
                                                   spec.token_dtype, spec.tokenizer)
        return UserData(tokens=tokens, tokenizer=tokenizer, order=_global_indices(spec, tokens))
    if tokenizer is None or spec.token_cache is None:
        # Tokenised after the claim: check every document now, and (with a tokenizer) that
        # the corpus packs into enough sequences, tokenising only as much as that needs.
        needed = (spec.global_batch + spec.val_sequences) * spec.seq_len
        prefix = data.check_documents(spec.data, tokenizer, needed)
        if tokenizer is not None:
            data.make_dataset(prefix, spec.seq_len, spec.global_batch, spec.seed,
                              held_out=spec.val_sequences)
    return UserData(text=spec.data, tokenizer=tokenizer)


def _global_indices(spec: LmTrain, tokens: data.TokenCorpus) -> np.ndarray | None:
    """`LmTrain.global_indices`, checked against the training sequences and the steps."""
    if spec.global_indices is None:
        return None
    held_out = 0 if tokens.held_out else spec.val_sequences
    order = data.load_global_indices(
        spec.global_indices, data.num_sequences(tokens.tokens, spec.seq_len) - held_out)
    needed = spec.num_steps * spec.global_batch
    require(len(order) >= needed, f"{spec.global_indices}: {len(order)} entries, fewer than "
                                  f"num_steps × global_batch = {needed}")
    return order


def schedule_for_memory() -> None:
    """Has XLA's CPU compiler order each program to use little memory (XLA_FLAGS: call it
    before JAX's backend starts; a scheduler the user chose is kept). The default order held
    the 300M step (B=4, L=256, remat) at 4.3 GB of temporaries on one CPU device instead of
    2.7 GB, and on 4 devices gathered every layer's FSDP weights up front (2.7 GB per device
    instead of 1.5); the results are the same and the `cpu-small` step no slower."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_scheduler_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_MEMORY_SCHEDULER}".strip()


def is_token_data(path: str) -> bool:
    """Whether `path` is token data: a token file, a directory of only those, or a folder
    `rareret-tokenize` wrote."""
    if os.path.isfile(os.path.join(path, data.METADATA_FILE)):
        return True
    if os.path.isdir(path):
        return _holds(path, data.TOKEN_SUFFIXES) and not _holds(path, data.TEXT_SUFFIXES)
    return str(path).endswith(data.TOKEN_SUFFIXES)


def _holds(directory: str, suffixes) -> bool:
    try:
        return bool(data.shard_paths(directory, suffixes))
    except ConfigError:  # A directory without such files.
        return False


def padded_vocab(size: int) -> int:
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclasses.dataclass
class Corpus:
    tokens: tuple[np.ndarray, ...]
    vocab_size: int
    eos_id: int
    tokenizer: tokenizers.Tokenizer | None = None  # None for token data without one.
    held_out: tuple[np.ndarray, ...] = ()  # A held-out split's streams, if the data has one.
    order: np.ndarray | None = None  # `LmTrain.global_indices`.


def load_corpus(spec: LmTrain, workdir: str, inputs: UserData) -> Corpus:
    """The training corpus: token data as read, or text tokenised (once, by process 0, into
    `LmTrain.token_cache` or the workdir's `tokens/`) after training a tokenizer (once, saved
    in the workdir) if none is given. Never holds the corpus in memory: the tokens are mapped."""
    tokens, tokenizer_path = inputs.tokens, spec.tokenizer
    if tokens is None:
        path = inputs.text
        if path is None:  # The embedded corpus: process 0 writes it; the others wait.
            path = os.path.join(workdir, DATA_DIR, "stdlib_docs.json.gz")
            if processes.is_writer():
                corpus.write_default_corpus(path)
            processes.barrier("rareret.lm: default corpus written")
        if tokenizer_path is None:
            tokenizer_path = os.path.join(workdir, TOKENIZER_FILE)
            if processes.is_writer() and not os.path.exists(tokenizer_path):
                data.train_tokenizer((d.text for d in data.read_documents(path)),
                                     spec.vocab_size, tokenizer_path)
            processes.barrier("rareret.lm: tokenizer trained")
        cache = spec.token_cache or os.path.join(workdir, TOKENS_DIR)
        if processes.is_writer():
            pretokenize.cached(path, tokenizer_path, cache)
        processes.barrier("rareret.lm: corpus tokenised")
        tokens = data.TokenCorpus.from_tokenized(
            pretokenize.cache_path(path, tokenizer_path, cache))
    tokenizer = inputs.tokenizer or (data.load_tokenizer(tokenizer_path) if tokenizer_path
                                     else None)
    return Corpus(tokens.tokens, tokens.vocab_size, tokens.eos_id, tokenizer, tokens.held_out,
                  inputs.order)


def model_config(spec: LmTrain, vocab_size: int) -> lm_model.OlmoConfig:
    """The model of `spec` over a vocabulary of `vocab_size` tokens (padded)."""
    return ladder.config_for(spec.model, vocab_size=padded_vocab(vocab_size),
                             variant=spec.variant, compute_dtype=spec.compute_dtype,
                             remat=spec.remat, max_seq_len=max(spec.seq_len, 16))


def param_shardings(config: lm_model.OlmoConfig, mesh):
    """The parameters' shardings on `mesh`; ConfigError if a mesh axis does not divide one."""
    shardings = sharding.logical_sharding(lm_model.logical_partition_specs(config), mesh)
    sharding.check_divisible(lm_model.param_shapes(config), shardings)
    return shardings


class LmModel:
    """The sharded, compiled pieces of an LM run: init, train step and task evaluation."""

    def __init__(self, spec: LmTrain, vocab_size: int, mesh):
        self.spec, self.mesh = spec, mesh
        self.config = model_config(spec, vocab_size)
        self.tx = optimizer(spec)
        param_sh = param_shardings(self.config, mesh)
        abstract_params = lm_model.param_shapes(self.config)
        opt_sh = optax.tree_map_params(
            self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, abstract_params), param_sh,
            transform_non_params=lambda _: sharding.replicated(mesh))
        self.state_sharding = {"params": param_sh, "opt_state": opt_sh,
                               "step": sharding.replicated(mesh)}
        self.batch_sharding = sharding.batch_sharding(mesh)
        # Parameters first, then the optimiser state around them (the parameters donated):
        # the parameters' init temporaries are never live beside the optimiser state.
        self._init_params = jax.jit(self._params, out_shardings=param_sh)
        self._init_state = jax.jit(self._state, out_shardings=self.state_sharding,
                                   donate_argnums=0)
        self.train_step = jax.jit(
            self._train_step, in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, sharding.replicated(mesh)), donate_argnums=0)
    def traced(self, fn, *args):
        with jax.set_mesh(self.mesh), lm_model.nn.logical_axis_rules(sharding.RULES):
            return fn(*args)

    def init(self):
        params = self.traced(self._init_params, jax.random.key(self.spec.seed))
        return self.traced(self._init_state, params)

    def abstract_state(self):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(lambda rng: self._state(self._params(rng)),
                                           jax.random.key(0)),
                            self.state_sharding)

    def _params(self, rng):
        params = lm_model.Decoder(self.config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        return lm_model.nn.unbox(params)

    def _state(self, params):
        return {"params": params, "opt_state": self.tx.init(params),
                "step": jnp.zeros((), jnp.int32)}

    def _train_step(self, state, tokens_BxL):
        if fsdp.applies(self.mesh):
            param_specs = jax.tree.map(lambda s: s.spec, self.state_sharding["params"])
            loss, grads = fsdp.loss_and_grads(self.config, self.mesh, param_specs,
                                              state["params"], tokens_BxL)
        else:
            loss, grads = jax.value_and_grad(
                lambda p: lm_model.next_token_loss(self.config, p, tokens_BxL))(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "step": state["step"] + 1}, loss)

    def step(self, state, local_batch_bxL: np.ndarray):
        batch = jax.make_array_from_process_local_data(self.batch_sharding, local_batch_bxL)
        return self.traced(self.train_step, state, batch)


def _release_after(tree) -> None:
    """Waits for `tree`, then gives the pages of the temporaries freed by then back to the OS:
    glibc (`rareret.host_malloc`) would keep them beside the next computation's, and a
    record's and the steps' temporaries then added up.

    XLA's CPU runtime frees an execution's temporaries on its own threads after the outputs
    are ready: on 4 devices, 0.3 to 1 GB of a record's came free over the next 1 to 50 ms. So
    the pages are given back again over `_SETTLE_S`. Given back once, the rest stayed resident
    and the checkpoint after the record put its host copies beside it (20M rung, 4 devices:
    checkpoints peaked at 2.1 to 2.6 GB instead of 1.8)."""
    jax.block_until_ready(tree)
    host_malloc.release_free_memory()
    for delay in _SETTLE_S:
        time.sleep(delay)
        host_malloc.release_free_memory()


def spec_dict(spec: LmTrain) -> dict:
    return {"experiment": "lm", "lm": json.loads(json.dumps(dataclasses.asdict(spec),
                                                            default=list))}


class LmProgram(Program):
    """The LM experiment as a `rareret.run.Program`.

    Constructing it validates every input (`read_inputs`) and that the model fits the mesh, and
    builds the corpus, model, tasks, injector, data iterator and measurements when none of them
    needs a file in the workdir; otherwise `setup` builds them once the embedded corpus, a
    tokenizer trained on the corpus or the corpus's tokens are written there. The state is
    {"model": LmModel's state, "train_loss": the mean next-token loss over the last `train`
    call (NaN at step 0)}.
    """

    files = (DATA_DIR, TOKENIZER_FILE, TOKENS_DIR)

    def __init__(self, spec: LmTrain):
        self.lm_spec, self.checkpoint_every = spec, spec.checkpoint_every
        self.inputs = read_inputs(spec)
        require(not (spec.reference_templates and self.inputs.tokens is not None
                     and self.inputs.tokenizer is None),
                f"LmTrain.reference_templates=True needs text data or LmTrain.tokenizer; "
                f"LmTrain.data={spec.data} holds token files, which carry no tokenizer")
        self.mesh = sharding.make_mesh(spec.mesh)
        expected_vocab = (self.inputs.tokenizer.get_vocab_size() if self.inputs.tokenizer
                          else spec.vocab_size)
        param_shardings(model_config(spec, expected_vocab), self.mesh)  # Fits the mesh?
        self._built = False
        if self.inputs.tokens is not None:
            # Nothing to write into the workdir: build (and so check the corpus size and the
            # injection schedule) before it is touched; every process must agree.
            processes.agree(lambda: self._build(load_corpus(spec, "", self.inputs)))

    def spec(self) -> dict:
        return spec_dict(self.lm_spec)

    def record_steps(self) -> list[int]:
        return self.lm_spec.record_steps(self._injection_steps())

    def _injection_steps(self) -> list[int]:
        """Steps whose batch holds an instance of an `every_n` task."""
        spec = self.lm_spec
        return [t for task in spec.tasks if task.every_n
                for t in range(task.every_n - 1, spec.num_steps, task.every_n)]

    def record_specs(self):
        spec = self.lm_spec
        return measurements.record_specs([t.name for t in spec.tasks],
                                         ladder.config_for(spec.model).n_layers,
                                         bool(spec.probe_every), bool(spec.interference_every),
                                         spec.reference_templates)

    def setup(self, workdir: str) -> None:
        """Builds what `__init__` could not: the embedded corpus or a tokenizer trained on the
        corpus are written into the workdir first."""
        if not self._built:
            self._build(load_corpus(self.lm_spec, workdir, self.inputs))

    def _build(self, text: Corpus) -> None:
        """The model, tasks, injector, data pipeline and measurements over `text`."""
        spec = self.lm_spec
        self.model = LmModel(spec, text.vocab_size, self.mesh)
        tasks = [inject.build_task(t, text.vocab_size, reserved=(text.eos_id,))
                 for t in spec.tasks]
        self.injector = inject.Injector(tasks, spec.global_batch, spec.seq_len, text.eos_id,
                                        seed=spec.seed, process_index=jax.process_index(),
                                        process_count=jax.process_count())
        # Held-out text: the data's held-out split, else the last `val_sequences` sequences.
        held_out = 0 if text.held_out else spec.val_sequences
        self.dataset = data.make_dataset(text.tokens, spec.seq_len, spec.global_batch,
                                         spec.seed, jax.process_index(), jax.process_count(),
                                         held_out=held_out, order=text.order)
        self.iterator = data.make_iterator(self.dataset)
        self.measure = measurements.LmMeasurements(
            spec, self.model.config, self.mesh, tasks, text.eos_id,
            data.held_out_sequences(text.held_out or text.tokens, spec.seq_len,
                                    spec.val_sequences),
            templates.template_batches(text.tokenizer) if spec.reference_templates else None)
        self._window_records = spec.injection_records(self._injection_steps())
        if spec.interference_every:  # One row count for every record: one compiled program.
            self._task_rows = max([sum(self.injector.counts(t).values())
                                   for t in self.record_steps() if self._interference_at(t)],
                                  default=0)
        replicated = sharding.replicated(self.mesh)
        self._loss_sharding = replicated
        self._all_finite = jax.jit(
            lambda tree: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                            for x in jax.tree.leaves(tree)])),
            out_shardings=replicated)
        self._built = True

    def init(self) -> dict:
        # Made by a jitted function: device_put would compare the NaN across processes.
        nan = jax.jit(lambda: jnp.float32(jnp.nan), out_shardings=self._loss_sharding)()
        return {"model": self.model.init(), "train_loss": nan}

    def abstract_state(self) -> dict:
        return {"model": self.model.abstract_state(),
                "train_loss": jax.ShapeDtypeStruct((), jnp.float32,
                                                   sharding=self._loss_sharding)}

    def train(self, state: dict, start: int, stop: int) -> dict:
        model_state, loss_sum = state["model"], 0.0
        for step in range(start, stop):
            local_bxL, _ = self.injector.inject(next(self.iterator), step)
            model_state, loss = self.model.step(model_state, local_bxL)
            loss_sum = loss_sum + loss
        return {"model": model_state, "train_loss": loss_sum / (stop - start)}

    def running(self):
        return single_threaded_blas()  # The probes' numpy SVDs (see rareret/blas_threads.py).

    def validate_state(self, state: dict) -> str | None:
        if not bool(self._all_finite(state["train_loss"])):
            return "LM training diverged: non-finite loss"
        if not bool(self._all_finite(state["model"]["params"])):
            return "LM training diverged: non-finite parameters"
        return None

    def record(self, state: dict, step: int) -> dict:
        _release_after(state)
        spec, params = self.lm_spec, state["model"]["params"]
        injected = self.injector.distinct_injected(step)
        probes_now = bool(spec.probe_every) and step % spec.probe_every == 0
        row = {"step": np.int64(step), "lm_loss": state["train_loss"],
               **self.model.traced(self.measure.behaviour, params, injected, probes_now)}
        if spec.probe_every and not probes_now:
            row.update(self.measure.no_representations())
        if spec.interference_every and self._interference_at(step):
            _release_after(row)  # The behaviour's temporaries, before the gradients' are made.
            row.update(self._gradients(params, step))
        elif spec.interference_every:
            row.update(self.measure.no_gradients())
        _release_after(row)
        return row

    def _interference_at(self, step: int) -> bool:
        return step % self.lm_spec.interference_every == 0 or step in self._window_records

    def _gradients(self, params, step: int) -> dict:
        """Interference on the batch of `step` (the one the next update trains on)."""
        local_bxL, mask_bxL = self.injector.inject(self.dataset[step], step)
        owner_bxL = np.asarray(gradients.loss_owner(self.injector.row_tasks(step), mask_bxL,
                                                    len(self.injector.tasks)))
        tokens, owner = (jax.make_array_from_process_local_data(self.model.batch_sharding, a)
                         for a in (local_bxL, owner_bxL))
        return self.model.traced(self.measure.gradients, params, tokens, owner,
                                 self._task_rows)

    def summary(self, row) -> str:
        loss = float(row["lm_loss"])
        return f"lm loss {loss:.3f}" if np.isfinite(loss) else ""  # NaN: the step-0 record.

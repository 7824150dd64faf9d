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

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers

from rareret import processes, sharding
from rareret.errors import ConfigError, require
from rareret.lm import corpus, data, gradients, inject, ladder, measurements, templates
from rareret.lm import model as lm_model
from rareret.lm.optim import optimizer
from rareret.lm.spec import LmTrain
from rareret.run import Program

VOCAB_MULTIPLE = 128  # Pad the model vocabulary (OLMo: 50,280 → 50,304).
DATA_DIR, TOKENIZER_FILE = "data", "tokenizer.json"  # The program's files in the workdir.


@dataclasses.dataclass
class UserData:
    """The run's data as read and validated before the workdir is touched: token files
    (memory-mapped) or a text corpus's documents, neither for the embedded default corpus; and
    the user's tokenizer, if `LmTrain.tokenizer` names one."""

    tokens: data.TokenCorpus | None = None
    documents: list[data.Document] | None = None
    tokenizer: tokenizers.Tokenizer | None = None


def read_inputs(spec: LmTrain) -> UserData:
    """Reads and validates everything the run will read (mesh, tokenizer, data), so bad input
    fails before the workdir is touched; the data is kept, so it is read only once.

    Every process of a multi-process run calls it: when one process's input is bad (say, a
    file missing on its host), all of them raise (`processes.agree`).
    """
    device_count = jax.device_count()  # Starts the backend: every process reaches the check.
    return processes.agree(lambda: _read_inputs(spec, device_count))


def _read_inputs(spec: LmTrain, device_count: int) -> UserData:
    spec.mesh.resolve(device_count)
    tokenizer = data.load_tokenizer(spec.tokenizer) if spec.tokenizer else None
    if spec.data == "default":
        return UserData(tokenizer=tokenizer)
    require(os.path.exists(spec.data), f"LmTrain.data={spec.data}: no such file or directory")
    if is_token_data(spec.data):
        return UserData(tokens=data.TokenCorpus.from_token_files(spec.data, spec.vocab_size,
                                                                 spec.eos_id))
    return UserData(documents=list(data.read_documents(spec.data)), tokenizer=tokenizer)


def is_token_data(path: str) -> bool:
    """Whether `path` is OLMo-style .npy token data (a file, or a directory of only those)."""
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
    tokenizer: tokenizers.Tokenizer | None = None  # None for token-file data.


def load_corpus(spec: LmTrain, workdir: str, inputs: UserData) -> Corpus:
    """Tokens of the training corpus, training (once, saved in the workdir) a tokenizer if needed.

    Takes `inputs.documents` (they are dropped once tokenised).
    """
    if inputs.tokens is not None:
        return Corpus(inputs.tokens.tokens, spec.vocab_size, spec.eos_id)
    documents, inputs.documents = inputs.documents, None
    if documents is None:  # The embedded corpus: process 0 writes it; the others wait.
        path = os.path.join(workdir, "data", "stdlib_docs.json.gz")
        if processes.is_writer():
            corpus.write_default_corpus(path)
        processes.barrier("rareret.lm: default corpus written")
        documents = list(data.read_documents(path))
    tokenizer = inputs.tokenizer
    if tokenizer is None:
        saved = os.path.join(workdir, "tokenizer.json")
        if processes.is_writer() and not os.path.exists(saved):
            data.train_tokenizer((d.text for d in documents), spec.vocab_size, saved)
        processes.barrier("rareret.lm: tokenizer trained")
        tokenizer = data.load_tokenizer(saved)
    token_corpus = data.TokenCorpus.from_documents(documents, tokenizer)
    return Corpus(token_corpus.tokens, token_corpus.vocab_size, token_corpus.eos_id, tokenizer)


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
        self._init = jax.jit(self._init_state, out_shardings=self.state_sharding)
        self.train_step = jax.jit(
            self._train_step, in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, sharding.replicated(mesh)), donate_argnums=0)
    def traced(self, fn, *args):
        with jax.set_mesh(self.mesh), lm_model.nn.logical_axis_rules(sharding.RULES):
            return fn(*args)

    def init(self):
        return self.traced(self._init, jax.random.key(self.spec.seed))

    def abstract_state(self):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            jax.eval_shape(self._init_state, jax.random.key(0)),
                            self.state_sharding)

    def _init_state(self, rng):
        params = lm_model.Decoder(self.config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        params = lm_model.nn.unbox(params)
        return {"params": params, "opt_state": self.tx.init(params),
                "step": jnp.zeros((), jnp.int32)}

    def _train_step(self, state, tokens_BxL):
        loss, grads = jax.value_and_grad(
            lambda p: lm_model.next_token_loss(self.config, p, tokens_BxL))(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "step": state["step"] + 1}, loss)

    def step(self, state, local_batch_bxL: np.ndarray):
        batch = jax.make_array_from_process_local_data(self.batch_sharding, local_batch_bxL)
        return self.traced(self.train_step, state, batch)


def spec_dict(spec: LmTrain) -> dict:
    return {"experiment": "lm", "lm": json.loads(json.dumps(dataclasses.asdict(spec),
                                                            default=list))}


class LmProgram(Program):
    """The LM experiment as a `rareret.run.Program`.

    Constructing it validates every input (`read_inputs`) and that the model fits the mesh, and
    builds the corpus, model, tasks, injector, data iterator and measurements when none of them
    needs a file in the workdir; otherwise `setup` builds them once the embedded corpus or a
    tokenizer trained on the corpus is written there. The state is {"model": LmModel's state,
    "train_loss": the mean next-token loss over the last `train` call (NaN at step 0)}.
    """

    files = (DATA_DIR, TOKENIZER_FILE)

    def __init__(self, spec: LmTrain):
        self.lm_spec, self.checkpoint_every = spec, spec.checkpoint_every
        self.inputs = read_inputs(spec)
        require(not (spec.reference_templates and self.inputs.tokens is not None),
                f"LmTrain.reference_templates=True needs text data; LmTrain.data={spec.data} "
                f"holds token files, which carry no tokenizer")
        self.mesh = sharding.make_mesh(spec.mesh)
        expected_vocab = (self.inputs.tokenizer.get_vocab_size() if self.inputs.tokenizer
                          else spec.vocab_size)
        param_shardings(model_config(spec, expected_vocab), self.mesh)  # Fits the mesh?
        self._built = False
        if self.inputs.tokens is not None or (self.inputs.documents is not None
                                              and self.inputs.tokenizer is not None):
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
        self.dataset = data.make_dataset(text.tokens, spec.seq_len, spec.global_batch,
                                         spec.seed, jax.process_index(), jax.process_count(),
                                         held_out=spec.val_sequences)
        self.iterator = data.make_iterator(self.dataset)
        self.measure = measurements.LmMeasurements(
            spec, self.model.config, self.mesh, tasks, text.eos_id,
            data.held_out_sequences(text.tokens, spec.seq_len, spec.val_sequences),
            templates.template_batches(text.tokenizer) if spec.reference_templates else None)
        self._window_records = spec.injection_records(self._injection_steps())
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

    def validate_state(self, state: dict) -> str | None:
        if not bool(self._all_finite(state["train_loss"])):
            return "LM training diverged: non-finite loss"
        if not bool(self._all_finite(state["model"]["params"])):
            return "LM training diverged: non-finite parameters"
        return None

    def record(self, state: dict, step: int) -> dict:
        spec, params = self.lm_spec, state["model"]["params"]
        injected = self.injector.distinct_injected(step)
        row = {"step": np.int64(step), "lm_loss": state["train_loss"],
               **self.model.traced(self.measure.behaviour, params, injected)}
        if spec.probe_every:
            row.update(self.model.traced(self.measure.representations, params, injected)
                       if step % spec.probe_every == 0 else self.measure.no_representations())
        if spec.interference_every:
            row.update(self._gradients(params, step) if self._interference_at(step)
                       else self.measure.no_gradients())
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
        return self.model.traced(self.measure.gradients, params, tokens, owner)

    def summary(self, row) -> str:
        loss = float(row["lm_loss"])
        return f"lm loss {loss:.3f}" if np.isfinite(loss) else ""  # NaN: the step-0 record.

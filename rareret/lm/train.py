"""The sharded language-model loop (PAPER.md §2): an OLMo-style decoder on packed text with rare
synthetic tasks injected at controlled frequencies.

Per step: the grain iterator yields this process's rows of the global batch, the `Injector` writes
task instances over the first tokens of chosen rows, the rows become one global array sharded
over (data, fsdp), and a jitted step (parameters and optimiser state sharded by the logical-axis
rules of `rareret.sharding`, state donated) applies AdamW with warm-up + cosine decay.

Records (`<workdir>/metrics/`, every `record_every` steps and at the end): `lm_loss` [record]
(mean training loss since the previous record), `task_loss` [record, task] (cross-entropy of
LABEL on the task's injected train instances) and `task_accuracy` [record, task] (full-vocabulary
argmax = LABEL on its held-out test instances). Checkpoints (orbax, `<workdir>/checkpoints/`)
hold the train state, the grain iterator state and the losses not yet recorded; a restart
resumes from the latest one and rolls the arrays back to it, so a resumed run's arrays equal an
uninterrupted run's.

Shapes: B global batch, b local batch, L sequence, V vocab, N eval instances.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers
from jax.experimental import multihost_utils

from rareret import sharding, store
from rareret.checkpoint import Checkpoints
from rareret.preemption import PreemptionGuard
from rareret.errors import ConfigError, is_number, one_line, require, require_int_fields
from rareret.lm import corpus, data, inject, ladder
from rareret.lm import model as lm_model
from rareret.progress import Progress

VOCAB_MULTIPLE = 128  # Pad the model vocabulary (OLMo: 50,280 → 50,304).


@dataclasses.dataclass
class UserData:
    """The run's data as read and validated before the workdir is touched: token files
    (memory-mapped) or a text corpus's documents, neither for the embedded default corpus; and
    the user's tokenizer, if `LmTrain.tokenizer` names one."""

    tokens: data.TokenCorpus | None = None
    documents: list[data.Document] | None = None
    tokenizer: tokenizers.Tokenizer | None = None


def read_inputs(spec: LmTrain) -> UserData:
    """Reads and validates everything `run_lm` will read (mesh, tokenizer, data), so bad input
    fails before the workdir is touched; the data is kept, so it is read only once.

    Every process of a multi-process run calls it: when one process's input is bad (say, a
    file missing on its host), all of them raise, instead of the others waiting for it in their
    first collective.
    """
    device_count = jax.device_count()  # Starts the backend: every process reaches the check.
    try:
        inputs, error = _read_inputs(spec, device_count), None
    except ConfigError as e:
        inputs, error = None, e
    failures = _process_errors(error)
    if error:
        raise error
    if failures:  # Another process's input was bad: its message, naming the process.
        raise ConfigError(failures[min(failures)])
    return inputs


_MESSAGE_BYTES = 512


def _process_errors(error: ConfigError | None) -> dict[int, str]:
    """Every process's one-line error, by process index (a collective in multi-process runs)."""
    if jax.process_count() == 1:
        return {}
    encoded = np.zeros(_MESSAGE_BYTES, np.uint8)
    if error:
        text = one_line(error).encode()[:_MESSAGE_BYTES]
        encoded[:len(text)] = np.frombuffer(text, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(encoded)).reshape(
        jax.process_count(), _MESSAGE_BYTES)
    return {p: f"process {p}: " + bytes(row).rstrip(b"\0").decode(errors="replace")
            for p, row in enumerate(gathered) if row.any()}


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


def sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-process run; nothing on one process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def padded_vocab(size: int) -> int:
    return -(-size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


@dataclasses.dataclass
class Corpus:
    tokens: tuple[np.ndarray, ...]
    vocab_size: int
    eos_id: int


def load_corpus(spec: LmTrain, workdir: str, inputs: UserData) -> Corpus:
    """Tokens of the training corpus, training (once, saved in the workdir) a tokenizer if needed.

    Takes `inputs.documents` (they are dropped once tokenised).
    """
    if inputs.tokens is not None:
        return Corpus(inputs.tokens.tokens, spec.vocab_size, spec.eos_id)
    documents, inputs.documents = inputs.documents, None
    if documents is None:  # The embedded corpus: process 0 writes it; the others wait.
        path = os.path.join(workdir, "data", "stdlib_docs.json.gz")
        if jax.process_index() == 0:
            corpus.write_default_corpus(path)
        sync_processes("rareret.lm: default corpus written")
        documents = list(data.read_documents(path))
    tokenizer = inputs.tokenizer
    if tokenizer is None:
        saved = os.path.join(workdir, "tokenizer.json")
        if jax.process_index() == 0 and not os.path.exists(saved):
            data.train_tokenizer((d.text for d in documents), spec.vocab_size, saved)
        sync_processes("rareret.lm: tokenizer trained")
        tokenizer = data.load_tokenizer(saved)
    token_corpus = data.TokenCorpus.from_documents(documents, tokenizer)
    return Corpus(token_corpus.tokens, token_corpus.vocab_size, token_corpus.eos_id)


def optimizer(spec: LmTrain) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, spec.learning_rate, max(spec.warmup_steps, 1), max(spec.num_steps, 2),
        end_value=spec.learning_rate * spec.min_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(spec.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8,
                                   weight_decay=spec.weight_decay))


def next_token_loss(config, params, tokens_BxL) -> jax.Array:
    logits_BxLxV = lm_model.apply(config, params, tokens_BxL)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV[:, :-1], tokens_BxL[:, 1:]).mean()


class LmProgram:
    """The sharded, compiled pieces of an LM run: init, train step and task evaluation."""

    def __init__(self, spec: LmTrain, vocab_size: int, mesh):
        self.spec, self.mesh = spec, mesh
        self.config = ladder.config_for(spec.model, vocab_size=padded_vocab(vocab_size),
                                        variant=spec.variant, compute_dtype=spec.compute_dtype,
                                        remat=spec.remat, max_seq_len=max(spec.seq_len, 16))
        self.tx = optimizer(spec)
        param_sh = sharding.logical_sharding(lm_model.logical_partition_specs(self.config), mesh)
        abstract_params = lm_model.param_shapes(self.config)
        sharding.check_divisible(abstract_params, param_sh)
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
        self.task_metrics = jax.jit(self._task_metrics,
                                    out_shardings=sharding.replicated(mesh))

    def _traced(self, fn, *args):
        with jax.set_mesh(self.mesh), lm_model.nn.logical_axis_rules(sharding.RULES):
            return fn(*args)

    def init(self):
        return self._traced(self._init, jax.random.key(self.spec.seed))

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
            lambda p: next_token_loss(self.config, p, tokens_BxL))(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        return ({"params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "step": state["step"] + 1}, loss)

    def step(self, state, local_batch_bxL: np.ndarray):
        batch = jax.make_array_from_process_local_data(self.batch_sharding, local_batch_bxL)
        return self._traced(self.train_step, state, batch)

    def _task_metrics(self, params, tokens_NxI, labels_N):
        """(mean CE of LABEL, accuracy of argmax = LABEL) given TOK1 TOK2, per instance set."""
        logits_NxV = lm_model.apply(self.config, params, tokens_NxI)[:, inject.LABEL_POS - 1]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits_NxV, labels_N).mean()
        return loss, jnp.mean(jnp.argmax(logits_NxV, axis=-1) == labels_N)

    def evaluate(self, params, eval_sets) -> dict[str, np.ndarray]:
        losses, accuracies = [], []
        for train_set, test_set in eval_sets:
            losses.append(self._traced(self.task_metrics, params, *train_set)[0])
            accuracies.append(self._traced(self.task_metrics, params, *test_set)[1])
        return {"task_loss": np.asarray(jax.device_get(losses), np.float32),
                "task_accuracy": np.asarray(jax.device_get(accuracies), np.float32)}


def record_specs(num_tasks: int, task_names: list[str]) -> dict[str, store.RecordSpec]:
    tasks_attr = {"tasks": task_names}
    return {
        "step": store.RecordSpec((), np.int64, (), {"description": "training steps taken"}),
        "lm_loss": store.RecordSpec((), np.float32, (), {
            "description": "next-token cross-entropy averaged over the steps since the last record"}),
        "task_loss": store.RecordSpec((num_tasks,), np.float32, ("task",), {
            **tasks_attr, "description": "cross-entropy of LABEL on injected (train) instances"}),
        "task_accuracy": store.RecordSpec((num_tasks,), np.float32, ("task",), {
            **tasks_attr, "description": "argmax over the vocabulary = LABEL, held-out instances"}),
    }


def eval_sets(tasks: list[inject.Task], eos_id: int, count: int):
    """Per task: ((tokens, labels) of train instances, (tokens, labels) of test instances)."""
    out = []
    for task in tasks:
        pair = []
        for split in ("train", "test"):
            tokens_NxI, label_pos = inject.eval_batch(task, eos_id, split)
            tokens_NxI = np.asarray(tokens_NxI[:count], np.int32)
            pair.append((tokens_NxI, tokens_NxI[:, label_pos]))
        out.append(tuple(pair))
    return out


def write_spec(workdir: str, spec: LmTrain) -> None:
    with open(os.path.join(workdir, "spec.json"), "w") as f:
        json.dump(spec_dict(spec), f, indent=2)


def spec_dict(spec: LmTrain) -> dict:
    return {"experiment": "lm", "lm": json.loads(json.dumps(dataclasses.asdict(spec),
                                                            default=list))}


def run_lm(spec: LmTrain, workdir: str, show_progress: bool = True,
           inputs: UserData | None = None) -> bool:
    """Trains (or resumes) the LM run in `workdir`; False if stopped early by SIGTERM/SIGINT.

    `inputs`: the data from `read_inputs(spec)`, if the caller validated it already.
    """
    if inputs is None:
        inputs = read_inputs(spec)
    mesh = sharding.make_mesh(spec.mesh)
    writer_process = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    # Every process has claimed (maybe cleared) the shared workdir before any writes into it.
    sync_processes("rareret.lm: workdir claimed")
    text = load_corpus(spec, workdir, inputs)
    program = LmProgram(spec, text.vocab_size, mesh)
    tasks = [inject.build_task(t, text.vocab_size, reserved=(text.eos_id,)) for t in spec.tasks]
    injector = inject.Injector(tasks, spec.global_batch, spec.seq_len, text.eos_id,
                               seed=spec.seed, process_index=jax.process_index(),
                               process_count=jax.process_count())
    dataset = data.make_dataset(text.tokens, spec.seq_len, spec.global_batch, spec.seed,
                                jax.process_index(), jax.process_count())
    iterator = data.make_iterator(dataset)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
    metrics_dir = os.path.join(workdir, "metrics")
    task_names = [t.name for t in spec.tasks]
    start, pending, losses = checkpoints.latest(), [], []
    if start is None:
        start, state = 0, program.init()
        writer = (store.MetricWriter.create(metrics_dir, record_specs(len(tasks), task_names),
                                            {}, overwrite=True) if writer_process else None)
        if writer_process:
            write_spec(workdir, spec)
    else:
        state, extra = checkpoints.restore(start, program.abstract_state(), iterator)
        pending = extra["pending_losses"]
        writer = store.MetricWriter.open(metrics_dir) if writer_process else None
        if writer:  # Records past the checkpoint are rolled back and recomputed.
            steps = store.open_metrics(metrics_dir).read("step")
            writer.truncate(int(np.sum(steps <= start)))
    evals = eval_sets(tasks, text.eos_id, spec.eval_instances)
    progress = Progress(spec.num_steps) if show_progress and writer_process else None
    tokens_per_step = spec.global_batch * spec.seq_len

    def collect(done: int) -> None:
        """Moves the step losses in flight to `pending`; stops on a non-finite one."""
        pending.extend(float(x) for x in jax.device_get(losses))
        losses.clear()
        require(all(math.isfinite(x) for x in pending),
                f"LM training diverged by step {done}: non-finite loss; the last good checkpoint "
                f"is step {checkpoints.latest()}")

    def record(step: int) -> None:
        lm_loss = float(np.mean(pending)) if pending else float("nan")
        row = {"step": np.int64(step), "lm_loss": np.float32(lm_loss),
               **program.evaluate(state["params"], evals)}
        if writer:
            writer.append({name: np.asarray(value)[None] for name, value in row.items()})
        pending.clear()

    if start == 0:
        record(0)
    started = time.perf_counter()

    def save(done: int) -> None:
        collect(done)
        checkpoints.save(done, state, iterator, {"pending_losses": pending})

    with PreemptionGuard() as guard:
        for step in range(start, spec.num_steps):
            local, _ = injector.inject(next(iterator), step)
            state, loss = program.step(state, local)
            losses.append(loss)
            done = step + 1
            if done % spec.record_every == 0 or done == spec.num_steps:
                collect(done)
                record(done)
            if done % spec.checkpoint_every == 0 or done == spec.num_steps:
                save(done)
            elif preempted(guard, done, spec.record_every):
                save(done)
                print(f"preempted: saved step {done}; re-run the same command to resume",
                      file=sys.stderr)
                checkpoints.close()
                return False
            if progress and (done % spec.record_every == 0 or done == spec.num_steps):
                rate = (done - start) * tokens_per_step / (time.perf_counter() - started)
                progress.update(done, f"{rate:,.0f} tokens/s")
    checkpoints.close()
    return True


def preempted(guard: PreemptionGuard, step: int, every: int) -> bool:
    """Whether to stop now; processes agree (checked every `every` steps on multi-host runs)."""
    if jax.process_count() == 1:
        return guard.requested
    if step % every:
        return False
    flags = multihost_utils.process_allgather(np.array(guard.requested))
    return bool(np.any(flags))

"""The language-model experiment's spec, `LmTrain` (no JAX): what to train, on what, and how
long. Validated on construction; `rareret.lm.train` runs it."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from rareret.errors import is_int, is_number, require, require_int_fields
from rareret.lm import inject, ladder
from rareret.mesh_spec import MeshSpec


@dataclasses.dataclass(frozen=True)
class LmTrain:
    """What to train and on what (gin name `LmTrain`).

    Attributes:
      model: ladder rung (`python -m rareret.lm.ladder` lists them).
      variant, compute_dtype, remat: passed to the model config.
      data: a Dolma shard or directory of shards, a token file (`.npy`, or OLMo's raw `.npy` /
        `.bin`) or directory of them, a folder `rareret-tokenize` wrote, or "default" (the
        embedded stdlib-docstring corpus, built offline in the workdir).
      tokenizer: a tokenizer.json for text data; None trains a byte-level BPE of `vocab_size`
        on the corpus and saves it in the workdir. With token data it must be the tokenizer
        that the folder's metadata records (and enables `reference_templates`).
      vocab_size: BPE size to train, or the vocabulary of token files without metadata.
      eos_id: end-of-document id of token files without metadata.
      token_dtype: "uint16" or "uint32", the dtype of raw (headerless) token files.
      global_indices: OLMo's global-indices file (a 1-D array of sequence indices, raw uint32
        or `.npy`): step t trains on entries [t·B, (t+1)·B). None: the seeded shuffle.
        Token data only; it must hold num_steps · global_batch entries.
      token_cache: folder for the tokens of text data (a subfolder per tokenizer and corpus,
        reused by later runs); None: `tokens/` in the workdir.
      seq_len, global_batch, num_steps: sequence length, sequences per step, steps.
      learning_rate, warmup_steps, min_lr_ratio: AdamW peak rate, linear warm-up, cosine decay
        to min_lr_ratio · peak at the last step.
      weight_decay, clip_norm: AdamW decoupled decay; global-norm gradient clipping.
      record_every: steps between metric records (behaviour: losses and task metrics).
      checkpoint_every: steps between checkpoints (taken at the first record at or past each
        multiple, and at the end).
      seed: data order, model init and injection placement.
      tasks: injected tasks (`inject.TaskSpec`s); none is a plain LM run.
      eval_instances: None scores every train and test instance of each task; a number caps
        both splits at their first `eval_instances` instances.
      eval_batch: instances per evaluation batch (memory only; results do not change).
      val_sequences: packed sequences held out of training for `val_loss` (0: none).
      probe_every: steps between representation probes and MLP ablations (0: never).
      interference_every: steps between LM gradient-interference records (0: never).
      interference_top_k: first-layer MLP neurons per task in the gradient measurements.
      reference_templates: also record `reference_loss` on the natural-text counterparts of
        the tasks (R_cmp, R_add; `rareret.lm.templates`); needs text data.
      injection_window: with interference on, also record (with interference) the state just
        before each injection of an `every_n` task and after each of the next
        `injection_window` + 1 steps.
      mesh: device mesh (`MeshSpec`).
    """

    model: str = "tiny"
    variant: str = "olmo"
    compute_dtype: str = "float32"
    remat: bool = False
    data: str = "default"
    tokenizer: str | None = None
    vocab_size: int = 512
    eos_id: int = 0
    token_dtype: str | None = None
    global_indices: str | None = None
    token_cache: str | None = None
    seq_len: int = 128
    global_batch: int = 16
    num_steps: int = 200
    learning_rate: float = 3e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    record_every: int = 20
    checkpoint_every: int = 50
    seed: int = 0
    tasks: Sequence[inject.TaskSpec] = ()
    eval_instances: int | None = None
    eval_batch: int = 1000
    val_sequences: int = 16
    probe_every: int = 0
    interference_every: int = 0
    interference_top_k: int = 64
    injection_window: int = 0
    reference_templates: bool = False
    mesh: MeshSpec = MeshSpec()

    def __post_init__(self):
        require_int_fields(self, 1, "vocab_size", "seq_len", "global_batch", "num_steps",
                           "record_every", "checkpoint_every", "eval_batch",
                           "interference_top_k")
        require_int_fields(self, 0, "warmup_steps", "seed", "eos_id", "val_sequences",
                           "probe_every", "interference_every", "injection_window")
        require(self.token_dtype in (None, "uint16", "uint32"),
                f"LmTrain.token_dtype={self.token_dtype!r} must be None, 'uint16' or 'uint32'")
        for name in ("global_indices", "token_cache"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, str) and value != ""),
                    f"LmTrain.{name}={value!r} must be None or a path")
        require(isinstance(self.reference_templates, bool),
                f"LmTrain.reference_templates={self.reference_templates!r} must be True or False")
        require(self.eval_instances is None
                or (is_int(self.eval_instances) and self.eval_instances >= 1),
                f"LmTrain.eval_instances={self.eval_instances!r} must be None (all) or an "
                f"integer ≥ 1")
        require(self.warmup_steps < self.num_steps, f"LmTrain.warmup_steps={self.warmup_steps} "
                f"must be < num_steps={self.num_steps} (warm-up, then cosine decay to the end)")
        require(is_number(self.learning_rate) and 0 < self.learning_rate < math.inf,
                f"LmTrain.learning_rate={self.learning_rate!r} must be a finite number > 0")
        for name in ("min_lr_ratio", "weight_decay"):
            value = getattr(self, name)
            require(is_number(value) and 0 <= value <= 1,
                    f"LmTrain.{name}={value!r} must be a number in [0, 1]")
        require(is_number(self.clip_norm) and self.clip_norm > 0,
                f"LmTrain.clip_norm={self.clip_norm!r} must be a number > 0")
        require(self.seq_len >= inject.INSTANCE_LEN,
                f"LmTrain.seq_len={self.seq_len} must be ≥ {inject.INSTANCE_LEN} (a task instance)")
        names = [t.name for t in self.tasks]
        require(len(set(names)) == len(names), f"LmTrain.tasks: duplicate task names {names}")
        inject.check_capacity(self.tasks, self.global_batch, self.seq_len)
        ladder.config_for(self.model, variant=self.variant, compute_dtype=self.compute_dtype,
                          remat=self.remat)  # Validates the model fields.

    def record_steps(self, injection_steps=()) -> list[int]:
        """Steps with a record: 0, every `record_every`, `probe_every` and `interference_every`
        step, the last, and the `injection_records` of `injection_steps`."""
        steps = {0, self.num_steps, *range(0, self.num_steps, self.record_every),
                 *self.injection_records(injection_steps)}
        for every in (self.probe_every, self.interference_every):
            if every:
                steps.update(range(0, self.num_steps, every))
        return sorted(steps)

    def injection_records(self, injection_steps) -> set[int]:
        """With interference and an `injection_window`: for each step t in `injection_steps`
        (a batch holding an instance of an `every_n` task), the records t (just before) and
        t + 1 … t + 1 + `injection_window` (after), within the run."""
        if not (self.interference_every and self.injection_window):
            return set()
        return {s for t in injection_steps for s in range(t, t + self.injection_window + 2)
                if s <= self.num_steps}

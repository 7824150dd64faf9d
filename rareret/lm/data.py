"""Language-model data: Dolma-format shards / OLMo token files → tokens → packed batches.

Shapes: see docs/method.md "Shape letters": B global batch, b = B / process_count local batch,
L sequence length; a stream's packed sequences [sequences, L] have no letter.

Sources:
  * Dolma shards: JSON lines (`id`, `text`, optional `source`; other fields ignored) in `.json`,
    `.jsonl`, optionally gzip (`.gz`) or zstd (`.zst`) compressed. `TokenCorpus.from_documents`
    tokenises them all up front into one token stream, each document followed by EOS.
  * OLMo-style token files: 1-D uint16/uint32 `.npy` arrays, memory-mapped, documents already
    separated by EOS (`TokenCorpus.from_token_files`).

Packing: each token stream is cut into len // L sequences of exactly L tokens (no padding, the
tail dropped); sequences never straddle two streams (files).

Order, a pure function of (seed, step): sequence indices are shuffled per epoch (grain's
`shuffle`, which reseeds every epoch) and repeated forever; step t takes positions [t·B, (t+1)·B)
of that stream, and process p takes rows [p·b, (p+1)·b) of it, so the processes' local batches
concatenate to the single-process batch. `make_dataset(...)[t]` is the batch of step t;
`make_iterator` wraps it in an iterator whose `get_state()/set_state()` (or orbax's
`grain.checkpoint.CheckpointSave/CheckpointRestore`) resume exactly.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import itertools
import json
import os
import zlib
from pathlib import Path
from typing import IO, Iterable, Iterator, NamedTuple, Sequence

import grain
import numpy as np
import tokenizers
import zstandard

from rareret.errors import ConfigError, is_int, one_line, require, require_process_slice

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".json.zst", ".jsonl.zst")
TOKEN_SUFFIXES = (".npy",)
_DECODE_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, UnicodeDecodeError)
_ENCODE_CHUNK = 1024  # documents per `encode_batch_fast` call.
_SCAN_CHUNK = 1 << 24  # tokens per chunk when validating a token file.


class Document(NamedTuple):
    """One Dolma document."""
    id: str
    text: str
    source: str | None = None


# ----------------------------------------------------------------------------- Dolma shards

def shard_paths(path: str | os.PathLike, suffixes: Sequence[str] = TEXT_SUFFIXES) -> list[Path]:
    """`path` itself if it is a file, else the files under it ending in `suffixes`, sorted."""
    path = Path(path)
    kinds = "/".join(suffixes)
    require(path.exists(), f"{path}: no such file or directory")
    if path.is_file():
        require(path.name.endswith(tuple(suffixes)), f"{path}: not a {kinds} file")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
    require(files, f"{path}: directory holds no {kinds} files")
    return files


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
        return io.TextIOWrapper(raw, encoding="utf-8")
    return open(path, encoding="utf-8")


def _parse(path: Path, lineno: int, line: str) -> Document:
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    require(isinstance(record, dict), f"{where}: not a JSON object")
    text, source = record.get("text"), record.get("source")
    require(isinstance(text, str), f"{where}: field 'text' is missing or not a string")
    require(source is None or isinstance(source, str), f"{where}: field 'source' is not a string")
    return Document(str(record.get("id", f"{path.name}:{lineno}")), text, source)


def read_shard(path: str | os.PathLike) -> Iterator[Document]:
    """The documents of one Dolma shard, in file order (blank lines skipped)."""
    path = Path(path)
    require(path.is_file() and path.name.endswith(TEXT_SUFFIXES),
            f"{path}: no such {'/'.join(TEXT_SUFFIXES)} file")
    lineno, count = 0, 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    count += 1
                    yield _parse(path, lineno, line)
    except _DECODE_ERRORS as e:
        raise ConfigError(f"{path}:{lineno + 1}: unreadable ({one_line(e)})") from None
    require(count > 0, f"{path}: empty shard (no documents)")


def read_documents(path: str | os.PathLike) -> Iterator[Document]:
    """The documents of a shard, or of every shard under a directory in sorted path order."""
    for shard in shard_paths(path):
        yield from read_shard(shard)


def _open_write(path: Path, raw: IO[bytes]) -> IO[str]:
    if path.name.endswith(".gz"):
        raw = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)  # deterministic bytes
    elif path.name.endswith(".zst"):
        raw = zstandard.ZstdCompressor().stream_writer(raw)
    return io.TextIOWrapper(raw, encoding="utf-8")


def write_shard(path: str | os.PathLike, documents: Iterable[Document]) -> Path:
    """Writes `documents` as a Dolma shard (format from the suffix), atomically; returns `path`."""
    path = Path(path)
    require(path.name.endswith(TEXT_SUFFIXES), f"{path}: not a {'/'.join(TEXT_SUFFIXES)} path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw, _open_write(path, raw) as f:
            for doc in documents:
                record = {"id": doc.id, "text": doc.text}
                if doc.source is not None:
                    record["source"] = doc.source
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """A HF `tokenizers` tokenizer.json with an `<|endoftext|>` token.

    Document text never encodes to special tokens (a literal "<|endoftext|>" in a document stays
    text), so EOS ids in a token stream are exactly the document boundaries.
    """
    path = Path(path)
    require(path.is_file(), f"{path}: no such tokenizer file")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare `Exception` for malformed files.
        raise ConfigError(f"{path}: not a tokenizer.json ({one_line(e)})") from None
    require(tokenizer.token_to_id(EOS) is not None, f"{path}: tokenizer has no {EOS} token")
    tokenizer.encode_special_tokens = True
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    path: str | os.PathLike) -> tokenizers.Tokenizer:
    """Trains a byte-level BPE of `vocab_size` (EOS included) on `texts`, saves it to `path`."""
    require(is_int(vocab_size) and vocab_size >= 257,
            f"train_tokenizer: vocab_size={vocab_size!r} must be an integer >= 257 "
            "(256 bytes + EOS)")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=int(vocab_size), special_tokens=[EOS], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return load_tokenizer(path)


def tokenize(texts: Iterable[str], tokenizer: tokenizers.Tokenizer) -> np.ndarray:
    """One token stream: each text's ids followed by EOS (uint16 if the vocab fits, else uint32)."""
    eos = tokenizer.token_to_id(EOS)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    texts, pieces = iter(texts), [np.zeros(0, dtype)]
    while chunk := list(itertools.islice(texts, _ENCODE_CHUNK)):
        encodings = tokenizer.encode_batch_fast(chunk, add_special_tokens=False)
        ids = itertools.chain.from_iterable(e.ids + [eos] for e in encodings)
        pieces.append(np.fromiter(ids, dtype))
    return np.concatenate(pieces)


# ----------------------------------------------------------------------------- token files

def _first_at_least(tokens: np.ndarray, bound: int) -> int | None:
    """Position of the first token >= bound, scanning in chunks (memory-mapped files)."""
    for start in range(0, len(tokens), _SCAN_CHUNK):
        bad = np.flatnonzero(tokens[start:start + _SCAN_CHUNK] >= bound)
        if len(bad):
            return start + int(bad[0])
    return None


def load_token_file(path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """A memory-mapped 1-D uint16/uint32 `.npy` token file, every id checked to be < vocab_size."""
    path = Path(path)
    require(path.is_file(), f"{path}: no such token file")
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a .npy array ({one_line(e)})") from None
    require(tokens.ndim == 1 and tokens.dtype in (np.uint16, np.uint32) and len(tokens) > 0,
            f"{path}: expected a non-empty 1-D uint16/uint32 array, got {tokens.dtype} "
            f"{tokens.shape}")
    bad = _first_at_least(tokens, vocab_size)
    if bad is not None:
        raise ConfigError(f"{path}: token id {tokens[bad]} at position {bad} is >= vocab size "
                          f"{vocab_size}")
    return tokens


@dataclasses.dataclass(frozen=True)
class TokenCorpus:
    """Token streams (one per source file, documents EOS-separated) and their vocabulary."""
    tokens: tuple[np.ndarray, ...]
    vocab_size: int
    eos_id: int

    @classmethod
    def from_documents(cls, documents: Iterable[Document],
                       tokenizer: tokenizers.Tokenizer) -> TokenCorpus:
        """Tokenises documents (e.g. `read_documents(path)`) into one stream."""
        stream = tokenize((doc.text for doc in documents), tokenizer)
        return cls((stream,), tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS))

    @classmethod
    def from_token_files(cls, path: str | os.PathLike, vocab_size: int,
                         eos_id: int) -> TokenCorpus:
        """Memory-maps a `.npy` token file, or every one under a directory in sorted order."""
        require(is_int(vocab_size) and vocab_size > 0 and is_int(eos_id)
                and 0 <= eos_id < vocab_size,
                f"TokenCorpus: need 0 <= eos_id < vocab_size, got eos_id={eos_id!r}, "
                f"vocab_size={vocab_size!r}")
        files = shard_paths(path, TOKEN_SUFFIXES)
        return cls(tuple(load_token_file(f, vocab_size) for f in files), vocab_size, eos_id)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


# ----------------------------------------------------------------------------- packed batches

class _Sequences:
    """The packed sequences [sequences, L] of token streams; a stream's tail (< L tokens) is
    dropped."""

    def __init__(self, tokens: np.ndarray | Sequence[np.ndarray], seq_len: int):
        streams = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
        require(streams and all(s.ndim == 1 for s in streams),
                "make_dataset: tokens must be a 1-D array or a non-empty sequence of them")
        self.blocks = [s[: len(s) // seq_len * seq_len].reshape(-1, seq_len) for s in streams]
        self.starts = np.cumsum([0] + [len(b) for b in self.blocks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, index_b: np.ndarray) -> np.ndarray:
        block_b = np.searchsorted(self.starts, index_b, side="right") - 1
        return np.stack([self.blocks[k][i - self.starts[k]]
                         for k, i in zip(block_b, index_b)]).astype(np.int32)


class _LocalBatch(grain.transforms.Map):
    """Global batch of sequence indices [B] → this process's token rows [b, L] (int32)."""

    def __init__(self, sequences: _Sequences, start: int, stop: int):
        self.sequences, self.start, self.stop = sequences, start, stop

    def map(self, index_B: np.ndarray) -> np.ndarray:
        return self.sequences.rows(index_B[self.start:self.stop])


def _grain_seed(seed: int) -> int:
    """Hashes the user seed: grain reseeds epoch e with seed + e, so unhashed, seed 1's first epoch
    would be seed 0's second."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def make_dataset(tokens: np.ndarray | Sequence[np.ndarray], seq_len: int, global_batch: int,
                 seed: int, process_index: int = 0, process_count: int = 1,
                 held_out: int = 0) -> grain.MapDataset:
    """Element t = this process's batch of step t, int32 [global_batch / process_count, seq_len].

    `tokens`: a 1-D token stream or a sequence of them (e.g. `TokenCorpus.tokens`). The last
    `held_out` packed sequences never enter training (`held_out_sequences` returns them).
    """
    for name, value, low in (("seq_len", seq_len, 1), ("global_batch", global_batch, 1),
                             ("seed", seed, 0)):
        require(is_int(value) and value >= low,
                f"make_dataset: {name}={value!r} must be an integer >= {low}")
    require_process_slice("make_dataset", global_batch, process_index, process_count)
    sequences = _Sequences(tokens, seq_len)
    require(len(sequences) >= global_batch + held_out,
            f"make_dataset: the corpus packs into {len(sequences)} sequences of {seq_len} tokens, "
            f"fewer than global_batch={global_batch} + {held_out} held out")
    local = global_batch // process_count
    order = grain.MapDataset.range(len(sequences) - held_out).shuffle(
        seed=_grain_seed(seed)).repeat()
    batches = order.batch(global_batch, drop_remainder=True)
    return batches.map(_LocalBatch(sequences, process_index * local, (process_index + 1) * local))


def held_out_sequences(tokens: np.ndarray | Sequence[np.ndarray], seq_len: int,
                       count: int) -> np.ndarray:
    """The last `count` packed sequences, int32 [count, seq_len]: the held-out text."""
    sequences = _Sequences(tokens, seq_len)
    if count == 0:
        return np.zeros((0, seq_len), np.int32)
    return sequences.rows(np.arange(len(sequences) - count, len(sequences), dtype=np.int64))


def make_iterator(dataset: grain.MapDataset, prefetch: int = 2) -> grain.DatasetIterator:
    """An iterator over `dataset` prefetching `prefetch` batches on as many threads.

    Its `get_state()` is a small JSON dict; `set_state` on a fresh iterator over the same
    dataset resumes exactly (also via orbax `grain.checkpoint.CheckpointSave/Restore`).
    """
    require(is_int(prefetch) and prefetch >= 0,
            f"make_iterator: prefetch={prefetch!r} must be an integer >= 0")
    options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))

"""Language-model data: Dolma-format shards / OLMo token files → tokens → packed batches.

Shapes: see docs/method.md "Shape letters": B global batch, b = B / process_count local batch,
L sequence length; a stream's packed sequences [sequences, L] have no letter.

Sources:
  * Dolma shards: JSON lines (`id`, `text`, optional `source`; other fields ignored) in `.json`,
    `.jsonl`, optionally gzip (`.gz`) or zstd (`.zst`) compressed. `TokenCorpus.from_documents`
    tokenises them all up front into one token stream, each document followed by EOS.
  * Token files, memory-mapped and never read whole, documents already separated by EOS
    (`TokenCorpus.from_token_files`): OLMo's raw headerless uint16/uint32 arrays (`.npy` or
    `.bin`; dtype from `token_dtype`), `.npy` arrays with a header, or a folder that
    `rareret-tokenize` wrote (`metadata.json`: dtype, vocabulary, EOS, a held-out split).

Packing, as OLMo cuts its instances: each token stream (file) is cut into len // L consecutive
sequences of exactly L tokens (no padding, the tail dropped); sequence indices run over the files
in order, so sequences never straddle two files.

Order: sequence indices are shuffled per epoch (grain's `shuffle`, which reseeds every epoch,
a pure function of (seed, step)) and repeated forever, or given (`order`, e.g. OLMo's global
indices file, `load_global_indices`); step t takes positions [t·B, (t+1)·B) of that stream, and
process p takes rows [p·b, (p+1)·b) of it, reading only those rows, so the processes' local
batches concatenate to the single-process batch. `make_dataset(...)[t]` is the batch of step t;
`make_iterator` wraps it in an iterator whose `get_state()/set_state()` (or orbax's
`grain.checkpoint.CheckpointSave/CheckpointRestore`) resume exactly.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import mmap
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
TOKEN_SUFFIXES = (".npy", ".bin")
TOKEN_DTYPES = ("uint16", "uint32")
METADATA_FILE = "metadata.json"  # In a folder rareret-tokenize wrote.
METADATA_FORMAT = "rareret-tokens/1"
_DECODE_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError, UnicodeDecodeError)
_ENCODE_CHUNK = 1024  # documents per `encode_batch_fast` call.
_SCAN_CHUNK = 1 << 22  # elements per read when validating a file (bounded memory).
_NPY_MAGIC = b"\x93NUMPY"


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


def shard_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, line) of every non-blank line of one Dolma shard, unparsed."""
    path = Path(path)
    require(path.is_file() and path.name.endswith(TEXT_SUFFIXES),
            f"{path}: no such {'/'.join(TEXT_SUFFIXES)} file")
    lineno, count = 0, 0
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    count += 1
                    yield lineno, line
    except _DECODE_ERRORS as e:
        raise ConfigError(f"{path}:{lineno + 1}: unreadable ({one_line(e)})") from None
    require(count > 0, f"{path}: empty shard (no documents)")


def parse_line(path: str | os.PathLike, lineno: int, line: str) -> Document:
    """The document on line `lineno` of shard `path`; ConfigError naming both if it is bad."""
    return _parse(Path(path), lineno, line)


def read_shard(path: str | os.PathLike) -> Iterator[Document]:
    """The documents of one Dolma shard, in file order (blank lines skipped)."""
    for lineno, line in shard_lines(path):
        yield _parse(Path(path), lineno, line)


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


def check_documents(path: str | os.PathLike, tokenizer: tokenizers.Tokenizer | None = None,
                    min_tokens: int = 0) -> np.ndarray:
    """Parses every document under `path` (streaming; ConfigError on the first bad one) and,
    with a tokenizer, tokenises only the first documents, up to `min_tokens` tokens: returns
    those tokens (all of the corpus's if it has fewer), to check its size cheaply."""
    pieces, count = [], 0
    for doc in read_documents(path):
        if tokenizer is not None and count < min_tokens:
            pieces.append(tokenizer.encode(doc.text, add_special_tokens=False).ids
                          + [tokenizer.token_to_id(EOS)])
            count += len(pieces[-1])
    return np.fromiter(itertools.chain.from_iterable(pieces), np.int64, count)


# ----------------------------------------------------------------------------- token files

def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _first_bad(array: np.memmap, bad) -> int | None:
    """Position of the first element of a memory-mapped `array` with `bad(chunk)` true, read
    through a fixed buffer (not the mapping: the file's pages never join this process's RSS)."""
    with open(array.filename, "rb") as f:
        f.seek(array.offset)
        for start in range(0, len(array), _SCAN_CHUNK):
            found = np.flatnonzero(bad(np.fromfile(f, array.dtype, _SCAN_CHUNK)))
            if len(found):
                return start + int(found[0])
    return None


def _has_npy_header(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_NPY_MAGIC)) == _NPY_MAGIC


def _map_file(path: Path, dtype: str | None, what: str, dtypes: Sequence[str]) -> np.memmap:
    """A 1-D memory map of `path`: a `.npy` array (its header gives the dtype), else raw `dtype`
    elements, OLMo's format (`dtype` None: refused)."""
    require(path.is_file(), f"{path}: no such {what}")
    if _has_npy_header(path):
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a .npy array ({one_line(e)})") from None
    else:
        require(dtype is not None, f"{path}: a raw {what} (no .npy header) needs its dtype, "
                                   f"one of {'/'.join(dtypes)}")
        require(dtype in dtypes, f"{path}: dtype {dtype!r} is not one of {'/'.join(dtypes)}")
        size, itemsize = path.stat().st_size, np.dtype(dtype).itemsize
        require(size % itemsize == 0, f"{path}: size {size} bytes is not a multiple of "
                                      f"{dtype}'s {itemsize} bytes")
        require(size > 0, f"{path}: empty {what}")
        array = np.memmap(path, dtype, mode="r")
    require(array.ndim == 1 and array.dtype.name in dtypes and len(array) > 0,
            f"{path}: expected a non-empty 1-D {'/'.join(dtypes)} array, got {array.dtype} "
            f"{array.shape}")
    return array


def load_token_file(path: str | os.PathLike, vocab_size: int, dtype: str | None = None,
                    check: bool = True) -> np.memmap:
    """A memory-mapped token file: `.npy`, or raw `dtype` (uint16/uint32) tokens as OLMo ships
    them; with `check`, every id is read once (in chunks) and must be < vocab_size."""
    path = Path(path)
    tokens = _map_file(path, dtype, "token file", TOKEN_DTYPES)
    bad = _first_bad(tokens, lambda chunk: chunk >= vocab_size) if check else None
    if bad is not None:
        raise ConfigError(f"{path}: token id {tokens[bad]} at position {bad} is >= vocab size "
                          f"{vocab_size}")
    return tokens


def load_global_indices(path: str | os.PathLike, num_sequences: int) -> np.memmap:
    """OLMo's global batch order: a 1-D array of sequence indices (raw uint32, as OLMo writes
    it, or a `.npy` of uint32/uint64/int64), every entry checked to be < num_sequences."""
    path = Path(path)
    order = _map_file(path, "uint32", "global-indices file", ("uint32", "uint64", "int64"))
    bad = _first_bad(order, lambda chunk: (chunk < 0) | (chunk >= num_sequences))
    if bad is not None:
        raise ConfigError(f"{path}: entry {order[bad]} at position {bad} is past the end of "
                          f"the {num_sequences} training sequences")
    return order


def read_metadata(directory: str | os.PathLike) -> dict:
    """The metadata.json of a folder `rareret-tokenize` wrote, checked against its files."""
    path = Path(directory) / METADATA_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({one_line(e)})") from None
    require(isinstance(meta, dict) and meta.get("format") == METADATA_FORMAT,
            f"{path}: not a {METADATA_FORMAT} metadata file")
    try:
        vocab, eos, dtype = int(meta["vocab_size"]), int(meta["eos_id"]), meta["dtype"]
        splits = {split: [(f["path"], int(f["tokens"])) for f in meta["files"][split]]
                  for split in ("train", "val")}
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: missing or bad field ({one_line(e)})") from None
    require(dtype in TOKEN_DTYPES and 0 <= eos < vocab,
            f"{path}: dtype={dtype!r}, eos_id={eos}, vocab_size={vocab} are inconsistent")
    itemsize = np.dtype(dtype).itemsize
    for name, count in splits["train"] + splits["val"]:
        file = Path(directory) / name
        size = file.stat().st_size if file.is_file() else None
        require(size == count * itemsize, f"{file}: expected {count} {dtype} tokens "
                                          f"({count * itemsize} bytes), found {size} bytes")
    return meta


@dataclasses.dataclass(frozen=True)
class TokenCorpus:
    """Token streams (one per source file, documents EOS-separated), their vocabulary, and the
    streams of a held-out split, if the data has one."""
    tokens: tuple[np.ndarray, ...]
    vocab_size: int
    eos_id: int
    held_out: tuple[np.ndarray, ...] = ()

    @classmethod
    def from_documents(cls, documents: Iterable[Document],
                       tokenizer: tokenizers.Tokenizer) -> TokenCorpus:
        """Tokenises documents (e.g. `read_documents(path)`) into one stream, in memory."""
        stream = tokenize((doc.text for doc in documents), tokenizer)
        return cls((stream,), tokenizer.get_vocab_size(), tokenizer.token_to_id(EOS))

    @classmethod
    def from_token_files(cls, path: str | os.PathLike, vocab_size: int, eos_id: int,
                         dtype: str | None = None,
                         tokenizer: str | os.PathLike | None = None) -> TokenCorpus:
        """Memory-maps a token file, every one under a directory in sorted order, or the
        folder `rareret-tokenize` wrote (its metadata gives vocabulary, EOS and dtype; a
        `tokenizer` file must be the one it records)."""
        if os.path.isfile(os.path.join(path, METADATA_FILE)):
            return cls.from_tokenized(path, tokenizer)
        require(is_int(vocab_size) and vocab_size > 0 and is_int(eos_id)
                and 0 <= eos_id < vocab_size,
                f"TokenCorpus: need 0 <= eos_id < vocab_size, got eos_id={eos_id!r}, "
                f"vocab_size={vocab_size!r}")
        files = shard_paths(path, TOKEN_SUFFIXES)
        return cls(tuple(load_token_file(f, vocab_size, dtype) for f in files), vocab_size,
                   eos_id)

    @classmethod
    def from_tokenized(cls, directory: str | os.PathLike,
                       tokenizer: str | os.PathLike | None = None) -> TokenCorpus:
        """The train and held-out streams of a folder `rareret-tokenize` wrote. Its tokens are
        not scanned: the tokenizer wrote them, and the sizes match the metadata."""
        meta = read_metadata(directory)
        if tokenizer is not None:
            digest = file_sha256(tokenizer)
            require(digest == meta.get("tokenizer_sha256"),
                    f"{Path(directory) / METADATA_FILE}: tokenizer_sha256 "
                    f"{str(meta.get('tokenizer_sha256'))[:12]}… is not that of {tokenizer} "
                    f"({digest[:12]}…)")
        dtype = meta["dtype"]
        split = {name: tuple(np.memmap(Path(directory) / f["path"], dtype, mode="r")
                             for f in meta["files"][name] if f["tokens"])
                 for name in ("train", "val")}
        require(split["train"], f"{Path(directory) / METADATA_FILE}: no training tokens")
        return cls(split["train"], int(meta["vocab_size"]), int(meta["eos_id"]), split["val"])

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


# ----------------------------------------------------------------------------- packed batches

def _file_position(stream: np.ndarray) -> tuple[str, int] | None:
    """(file, byte position of element 0) of a contiguous memory-mapped stream, else None."""
    mapping = getattr(stream, "_mmap", None)  # np.memmap's mmap, shared by its views.
    if not isinstance(stream, np.memmap) or mapping is None or stream.filename is None \
            or stream.strides != (stream.itemsize,):
        return None
    mapped_from = stream.offset - stream.offset % mmap.ALLOCATIONGRANULARITY
    base = np.frombuffer(mapping, np.uint8).__array_interface__["data"][0]
    return stream.filename, mapped_from + stream.__array_interface__["data"][0] - base


class _Sequences:
    """The packed sequences [sequences, L] of token streams; a stream's tail (< L tokens) is
    dropped. Rows of memory-mapped files are read with `os.pread`, only those asked for: read
    through the mapping, each would map a whole page-cache folio (up to MBs) into this process,
    and a long run's RSS would grow towards the corpus size."""

    def __init__(self, tokens: np.ndarray | Sequence[np.ndarray], seq_len: int):
        streams = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
        require(streams and all(s.ndim == 1 for s in streams),
                "make_dataset: tokens must be a 1-D array or a non-empty sequence of them")
        self.seq_len = seq_len
        self.blocks = [s[: len(s) // seq_len * seq_len].reshape(-1, seq_len) for s in streams]
        self.starts = np.cumsum([0] + [len(b) for b in self.blocks])
        self.files = [_file_position(s) for s in streams]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, index_b: np.ndarray) -> np.ndarray:
        block_b = np.searchsorted(self.starts, index_b, side="right") - 1
        rows_bxL = np.empty((len(index_b), self.seq_len), np.int32)
        descriptors = {}
        try:
            for r, (k, i) in enumerate(zip(block_b, index_b)):
                block, row = self.blocks[k], i - self.starts[k]
                if self.files[k] is None:
                    rows_bxL[r] = block[row]
                    continue
                if k not in descriptors:
                    descriptors[k] = os.open(self.files[k][0], os.O_RDONLY)
                size = block.itemsize * self.seq_len
                raw = os.pread(descriptors[k], size, self.files[k][1] + int(row) * size)
                rows_bxL[r] = np.frombuffer(raw, block.dtype)
        finally:
            for descriptor in descriptors.values():
                os.close(descriptor)
        return rows_bxL


class _LocalBatch(grain.transforms.Map):
    """Global batch of sequence indices [B] → this process's token rows [b, L] (int32)."""

    def __init__(self, sequences: _Sequences, start: int, stop: int):
        self.sequences, self.start, self.stop = sequences, start, stop

    def map(self, index_B: np.ndarray) -> np.ndarray:
        return self.sequences.rows(index_B[self.start:self.stop])


class _GivenOrder(grain.transforms.Map):
    """Step t → this process's sequence indices, from positions [t·B, (t+1)·B) of `order`."""

    def __init__(self, order: np.ndarray, global_batch: int, start: int, stop: int):
        self.order, self.global_batch, self.start, self.stop = order, global_batch, start, stop

    def map(self, step: int) -> np.ndarray:
        first = step * self.global_batch
        return np.asarray(self.order[first + self.start:first + self.stop], np.int64)


def _grain_seed(seed: int) -> int:
    """Hashes the user seed: grain reseeds epoch e with seed + e, so unhashed, seed 1's first epoch
    would be seed 0's second."""
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


def num_sequences(tokens: np.ndarray | Sequence[np.ndarray], seq_len: int) -> int:
    """How many sequences of `seq_len` the streams pack into."""
    return len(_Sequences(tokens, seq_len))


def make_dataset(tokens: np.ndarray | Sequence[np.ndarray], seq_len: int, global_batch: int,
                 seed: int, process_index: int = 0, process_count: int = 1,
                 held_out: int = 0, order: np.ndarray | None = None) -> grain.MapDataset:
    """Element t = this process's batch of step t, int32 [global_batch / process_count, seq_len].

    `tokens`: a 1-D token stream or a sequence of them (e.g. `TokenCorpus.tokens`). The last
    `held_out` packed sequences never enter training (`held_out_sequences` returns them).
    `order`: sequence indices, each < the training sequences (`load_global_indices` checks a
    file's); step t trains on order[t·B:(t+1)·B], and the dataset ends with the order's last
    whole batch. None: the seeded shuffle, repeated forever.
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
    start, stop = process_index * local, (process_index + 1) * local
    if order is not None:
        require(order.ndim == 1 and len(order) >= global_batch,
                f"make_dataset: the order holds {len(order)} indices, fewer than "
                f"global_batch={global_batch}")
        steps = grain.MapDataset.range(len(order) // global_batch)
        return steps.map(_GivenOrder(order, global_batch, start, stop)).map(
            _LocalBatch(sequences, 0, local))
    shuffled = grain.MapDataset.range(len(sequences) - held_out).shuffle(
        seed=_grain_seed(seed)).repeat()
    batches = shuffled.batch(global_batch, drop_remainder=True)
    return batches.map(_LocalBatch(sequences, start, stop))


def held_out_sequences(tokens: np.ndarray | Sequence[np.ndarray], seq_len: int,
                       count: int) -> np.ndarray:
    """The last `count` packed sequences, int32 [count, seq_len]: the held-out text."""
    sequences = _Sequences(tokens, seq_len)
    require(count <= len(sequences), f"held_out_sequences: the held-out text packs into "
                                     f"{len(sequences)} sequences of {seq_len} tokens, fewer "
                                     f"than the {count} asked for")
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

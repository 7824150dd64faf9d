"""Pre-tokenisation: Dolma shards → token memmaps + metadata, with bounded memory.

`tokenize_corpus` streams the documents of a shard or folder of shards (`data.TEXT_SUFFIXES`)
through a tokenizer.json into a folder:

    train.bin      raw uint16 tokens (uint32 above 65,536 ids), each document followed by EOS,
                   in document order: the stream `data.tokenize` makes in memory, bit for bit
    val.bin        the same for the first `val_documents` documents (the held-out split)
    metadata.json  format, tokenizer sha256, vocab size, EOS id, dtype, document and token
                   counts, the largest id of each file, and the sources (path, bytes, mtime)

The main process reads lines (decompressing) and writes tokens; worker processes parse and
tokenise chunks of lines, at most two chunks per worker in flight. The folder appears whole or
not at all (built beside it, then renamed). `cached` keys such a folder by the tokenizer and the
sources, so a run on text tokenises its corpus once (`rareret-tokenize` is the CLI).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from rareret.errors import require
from rareret.lm import data
from rareret.progress import Progress

TRAIN_FILE, VAL_FILE = "train.bin", "val.bin"
_CHUNK_LINES = 1024  # documents per worker task.
_AUTO_WORKERS_BYTES = 32 << 20  # `workers=None`: tokenise in process below this much input.
_tokenizer = None  # A worker's tokenizer.


def sources(path: str | os.PathLike) -> list[dict]:
    """The shards under `path`, each as {path, bytes, mtime_ns}: what a cache is keyed by."""
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size,
             "mtime_ns": p.stat().st_mtime_ns} for p in data.shard_paths(path)]


def cache_key(path: str | os.PathLike, tokenizer_path: str | os.PathLike) -> str:
    """16 hex digits naming the tokens of `path`'s shards under `tokenizer_path`."""
    key = {"format": data.METADATA_FORMAT, "tokenizer": data.file_sha256(tokenizer_path),
           "sources": sources(path)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(path: str | os.PathLike, tokenizer_path: str | os.PathLike,
               cache: str | os.PathLike) -> Path:
    """Where `cached` keeps the tokens of `path` under `tokenizer_path`: cache/<cache_key>."""
    return Path(cache) / cache_key(path, tokenizer_path)


def cached(path: str | os.PathLike, tokenizer_path: str | os.PathLike,
           cache: str | os.PathLike, workers: int | None = None) -> Path:
    """`cache_path(...)`, tokenising `path` into it unless it is there already."""
    out = cache_path(path, tokenizer_path, cache)
    if not (out / data.METADATA_FILE).is_file():
        tokenize_corpus(path, tokenizer_path, out, workers=workers)
    return out


def _chunks(shards: list[Path]) -> Iterator[tuple[str, list[tuple[int, str]], bool]]:
    """(shard, [(line number, line)] of up to _CHUNK_LINES documents, last chunk of the shard)."""
    for shard in shards:
        lines = data.shard_lines(shard)
        chunk = list(itertools.islice(lines, _CHUNK_LINES))
        while chunk:
            following = list(itertools.islice(lines, _CHUNK_LINES))
            yield str(shard), chunk, not following
            chunk = following


def _init_worker(tokenizer_path: str, threads: bool = False) -> None:
    """Loads the tokenizer; in a worker process without its own threads (the processes are the
    parallelism), in this process with them."""
    global _tokenizer
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _tokenizer = data.load_tokenizer(tokenizer_path)


def _encode(shard: str, lines: list[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
    """The chunk's tokens (each document followed by EOS) and each document's token count."""
    texts = [data.parse_line(shard, lineno, line).text for lineno, line in lines]
    eos = _tokenizer.token_to_id(data.EOS)
    encodings = _tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    lengths = np.array([len(e.ids) + 1 for e in encodings], np.int64)
    ids = itertools.chain.from_iterable(e.ids + [eos] for e in encodings)
    return np.fromiter(ids, np.uint32, int(lengths.sum())), lengths


def _results(tokenizer_path: str, chunks, workers: int):
    """`_encode` of each chunk, in order; in this process when workers <= 1."""
    if workers <= 1:
        _init_worker(tokenizer_path, threads=True)
        for shard, lines, last in chunks:
            yield (*_encode(shard, lines), len(lines), shard, last)
        return
    context = multiprocessing.get_context("spawn")  # No fork of a threaded (JAX) process.
    with concurrent.futures.ProcessPoolExecutor(workers, context, _init_worker,
                                                (tokenizer_path,)) as pool:
        pending = collections.deque()
        for shard, lines, last in chunks:
            pending.append((pool.submit(_encode, shard, lines), len(lines), shard, last))
            if len(pending) >= 2 * workers:
                future, *rest = pending.popleft()
                yield (*future.result(), *rest)
        while pending:
            future, *rest = pending.popleft()
            yield (*future.result(), *rest)


class _Writer:
    """Appends tokens to one raw file, counting documents and tokens and the largest id."""

    def __init__(self, path: Path, dtype):
        self.name, self.dtype, self.file = path.name, dtype, open(path, "wb")
        self.documents = self.tokens = self.max_token = 0

    def write(self, tokens: np.ndarray, documents: int) -> None:
        if len(tokens):
            tokens.astype(self.dtype, copy=False).tofile(self.file)
            self.max_token = max(self.max_token, int(tokens.max()))
        self.documents += documents
        self.tokens += len(tokens)

    def entry(self) -> dict:
        self.file.close()
        return {"path": self.name, "documents": self.documents, "tokens": self.tokens,
                "max_token": self.max_token}


def default_workers(path: str | os.PathLike) -> int:
    """1 for a small corpus (process start-up would dominate), else up to 8 processes."""
    size = sum(p.stat().st_size for p in data.shard_paths(path))
    return 1 if size < _AUTO_WORKERS_BYTES else max(1, min(8, os.cpu_count() or 1))


def tokenize_corpus(path: str | os.PathLike, tokenizer_path: str | os.PathLike,
                    out: str | os.PathLike, *, val_documents: int = 0,
                    workers: int | None = None, progress: bool = False) -> dict:
    """Tokenises the shards under `path` into the folder `out` (which must not hold files);
    the first `val_documents` documents form the held-out split. Returns the metadata."""
    require(val_documents >= 0, f"val_documents={val_documents} must be >= 0")
    out, tokenizer_path = Path(out), Path(tokenizer_path)
    require(not (out.exists() and any(out.iterdir())), f"{out}: already holds files")
    shards = data.shard_paths(path)
    tokenizer = data.load_tokenizer(tokenizer_path)
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    workers = default_workers(path) if workers is None else workers
    source_list = sources(path)
    total_mb = -(-sum(s["bytes"] for s in source_list) // 10**6)
    bar = Progress(total_mb, "MB") if progress else None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        train, val = _Writer(tmp / TRAIN_FILE, dtype), _Writer(tmp / VAL_FILE, dtype)
        done_mb = 0
        sizes = {s["path"]: s["bytes"] for s in source_list}
        for tokens, lengths, count, shard, last in _results(str(tokenizer_path),
                                                            _chunks(shards), workers):
            held = min(max(val_documents - val.documents, 0), count)
            split = int(lengths[:held].sum())
            val.write(tokens[:split], held)
            train.write(tokens[split:], count - held)
            if last:
                done_mb += sizes[str(Path(shard).resolve())] / 10**6
            if bar:
                bar.update(min(int(done_mb), total_mb),
                           f"{train.documents + val.documents} docs, "
                           f"{train.tokens + val.tokens} tokens")
        files = {"train": [train.entry()], "val": [val.entry()]}
        require(train.tokens > 0, f"{path}: every document went to the held-out split "
                                  f"(val_documents={val_documents})")
        if bar:
            bar.update(total_mb)
        meta = {"format": data.METADATA_FORMAT,
                "tokenizer": str(tokenizer_path.resolve()),
                "tokenizer_sha256": data.file_sha256(tokenizer_path),
                "vocab_size": vocab, "eos_id": tokenizer.token_to_id(data.EOS),
                "dtype": np.dtype(dtype).name,
                "documents": {k: v[0]["documents"] for k, v in files.items()},
                "tokens": {k: v[0]["tokens"] for k, v in files.items()},
                "files": files, "sources": source_list}
        (tmp / data.METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # Empty (checked above).
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta

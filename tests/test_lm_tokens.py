"""Token data as OLMo ships it and pre-tokenisation: raw memmaps, OLMo's global batch order,
rareret-tokenize and the token cache of a run on text, resume, bad input."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lm_corpus import golden_documents
from test_lm_data import _config_error
from rareret.lm import data, pretokenize, train
from rareret.lm.data import TokenCorpus, make_dataset, make_iterator
from rareret.lm.spec import LmTrain

REPO = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "data" / "lm_tokenizer.json"
L = 4


def _raw(path, values, dtype):
    """A raw headerless token file, written as OLMo writes them (np.memmap)."""
    mm = np.memmap(path, dtype=dtype, mode="w+", shape=(len(values),))
    mm[:] = values
    mm.flush()
    return path


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return data.write_shard(tmp_path_factory.mktemp("text") / "golden.jsonl.gz",
                            golden_documents())


@pytest.fixture(scope="module")
def in_memory(shard):
    """The golden corpus tokenised in memory, the way runs on text used to do it."""
    return TokenCorpus.from_documents(data.read_documents(shard), data.load_tokenizer(TOKENIZER))


# ----------------------------------------------------------------------------- raw memmaps

def test_raw_memmaps_load_and_pack_as_olmo_cuts_them(tmp_path):
    _raw(tmp_path / "a.bin", np.arange(3 * L + 2), np.uint16)  # 3 sequences, 2 dropped.
    _raw(tmp_path / "b.npy", 100 + np.arange(2 * L + 3), np.uint16)  # Headerless, OLMo's name.
    np.save(tmp_path / "c.npy", 200 + np.arange(L, dtype=np.uint16))  # With a header.
    corpus = TokenCorpus.from_token_files(tmp_path, vocab_size=300, eos_id=0, dtype="uint16")
    assert all(isinstance(t, np.memmap) for t in corpus.tokens)
    assert [len(t) for t in corpus.tokens] == [14, 11, 4]
    # Instance i runs over the files in order, each file cut into consecutive chunks of L.
    rows = make_dataset(corpus.tokens, L, 6, seed=0, order=np.arange(6))[0]
    starts = [0, 4, 8, 100, 104, 200]
    np.testing.assert_array_equal(rows, np.array([np.arange(s, s + L) for s in starts]))
    assert rows.dtype == np.int32


def test_uint32_raw_tokens(tmp_path):
    _raw(tmp_path / "big.bin", [70000, 1, 2, 3, 99999, 5, 6, 7], np.uint32)
    corpus = TokenCorpus.from_token_files(tmp_path / "big.bin", 100000, 0, dtype="uint32")
    np.testing.assert_array_equal(np.sort(make_dataset(corpus.tokens, L, 2, seed=0)[0][:, 0]),
                                  [70000, 99999])


def test_token_scan_reads_in_chunks(tmp_path, monkeypatch):
    """Every id is checked, also past the first read (the file is never read whole)."""
    monkeypatch.setattr(data, "_SCAN_CHUNK", 5)
    tokens = np.zeros(23, np.uint16)
    tokens[17] = 9
    _raw(tmp_path / "t.bin", tokens, np.uint16)
    _config_error(lambda: data.load_token_file(tmp_path / "t.bin", 9, "uint16"),
                  "t.bin", "token id 9 at position 17")
    assert len(data.load_token_file(tmp_path / "t.bin", 10, "uint16")) == 23


# ----------------------------------------------------------------------------- OLMo order

def test_global_indices_order_is_followed_exactly(tmp_path):
    tokens = np.arange(20 * L, dtype=np.uint16)  # Row i starts with i·L.
    order = np.array([7, 3, 19, 0, 3, 12, 5, 5, 1, 18, 2, 9, 4], np.uint32)
    _raw(tmp_path / "global_indices.npy", order, np.uint32)  # OLMo: raw uint32.
    loaded = data.load_global_indices(tmp_path / "global_indices.npy", 20)
    full = make_dataset(tokens, L, 4, seed=0, order=loaded)
    assert len(full) == 3  # 13 indices: 3 whole batches.
    for t in range(3):
        assert [int(r[0]) // L for r in full[t]] == order[4 * t:4 * t + 4].tolist()
        parts = [make_dataset(tokens, L, 4, 0, p, 2, order=loaded)[t] for p in range(2)]
        np.testing.assert_array_equal(np.concatenate(parts), full[t])
    np.save(tmp_path / "order64.npy", order.astype(np.uint64))
    np.testing.assert_array_equal(data.load_global_indices(tmp_path / "order64.npy", 20), order)


def test_global_indices_drive_a_run(tmp_path):
    _raw(tmp_path / "tokens.bin", np.arange(40 * 32) % 500, np.uint16)
    order = np.arange(40)[::-1].astype(np.uint32)
    _raw(tmp_path / "order.bin", order, np.uint32)
    spec = LmTrain(data=str(tmp_path / "tokens.bin"), token_dtype="uint16", vocab_size=512,
                   seq_len=32, global_batch=4, num_steps=10, warmup_steps=1, val_sequences=0,
                   global_indices=str(tmp_path / "order.bin"))
    program = train.LmProgram(spec)
    for t in (0, 9):
        np.testing.assert_array_equal(program.dataset[t], (order[4 * t:4 * t + 4, None] * 32
                                             + np.arange(32)) % 500)


# ----------------------------------------------------------------------------- pre-tokenising

def test_tokenize_matches_in_memory_tokenisation(shard, in_memory, tmp_path):
    meta = pretokenize.tokenize_corpus(shard, TOKENIZER, tmp_path / "tok")
    corpus = TokenCorpus.from_token_files(tmp_path / "tok", 1, 0, tokenizer=TOKENIZER)
    (stream,) = corpus.tokens
    assert isinstance(stream, np.memmap) and stream.dtype == np.uint16
    np.testing.assert_array_equal(stream, in_memory.tokens[0])
    assert (corpus.vocab_size, corpus.eos_id) == (in_memory.vocab_size, in_memory.eos_id)
    assert meta["documents"] == {"train": 160, "val": 0}
    assert meta["tokenizer_sha256"] == data.file_sha256(TOKENIZER)
    assert meta["files"]["train"][0]["max_token"] == int(in_memory.tokens[0].max())
    assert corpus.held_out == ()


def test_workers_and_held_out_split(shard, in_memory, tmp_path):
    """Two worker processes give the same stream; the first documents form the val split."""
    meta = pretokenize.tokenize_corpus(shard, TOKENIZER, tmp_path / "tok", val_documents=10,
                                       workers=2)
    corpus = TokenCorpus.from_token_files(tmp_path / "tok", 1, 0)
    eos = in_memory.eos_id
    (val,), (rest,) = corpus.held_out, corpus.tokens
    assert meta["documents"] == {"train": 150, "val": 10}
    assert np.count_nonzero(np.asarray(val) == eos) == 10 and val[-1] == eos
    np.testing.assert_array_equal(np.concatenate([val, rest]), in_memory.tokens[0])


def test_tokenize_cli(shard, tmp_path):
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "rareret.lm.tokenize_cli", f"--data={shard}",
           f"--tokenizer={TOKENIZER}", f"--out={out}", "--val_documents=5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "160 docs" in proc.stderr and "155 + 5 held-out documents" in proc.stdout
    assert json.loads((out / "metadata.json").read_text())["documents"] == {"train": 155,
                                                                            "val": 5}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"rareret-tokenize: error: {out}: already holds files"]


def test_bad_text_leaves_no_output(tmp_path):
    """A bad document, found by a worker process, is one ConfigError naming file and line; the
    output folder (and its temporary sibling) never appears."""
    lines = [json.dumps({"id": str(i), "text": f"doc {i}"}) for i in range(1500)]
    lines[1200] = '{"id": "x", "txt": "no text"}'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    _config_error(lambda: pretokenize.tokenize_corpus(tmp_path / "bad.jsonl", TOKENIZER,
                                                      tmp_path / "out", workers=2),
                  "bad.jsonl:1201:", "'text'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_cache_is_reused_and_keyed_by_tokenizer_and_sources(shard, tmp_path, monkeypatch):
    first = pretokenize.cached(shard, TOKENIZER, tmp_path)
    monkeypatch.setattr(pretokenize, "tokenize_corpus",
                        lambda *a, **k: pytest.fail("tokenised again"))
    assert pretokenize.cached(shard, TOKENIZER, tmp_path) == first
    copy = data.write_shard(tmp_path / "other" / "golden.jsonl.gz", golden_documents()[:-1])
    assert pretokenize.cache_path(copy, TOKENIZER, tmp_path) != first


@pytest.mark.parametrize("cache", ["workdir", "folder"])
def test_tokenize_then_train_equals_train_on_text_in_memory(shard, in_memory, tmp_path, cache):
    """A run on text reads its tokens from the cache; its batch of step t and its held-out
    text are those of the same text tokenised in memory."""
    spec = LmTrain(data=str(shard), tokenizer=str(TOKENIZER), seq_len=32, global_batch=8,
                   val_sequences=4, seed=3,
                   token_cache=str(tmp_path / "cache") if cache == "folder" else None)
    program = train.LmProgram(spec)
    if cache == "workdir":
        assert not hasattr(program, "dataset")  # Tokenised only once the workdir is claimed.
        program.setup(str(tmp_path))
        assert len(list((tmp_path / "tokens").iterdir())) == 1
    else:
        assert len(list((tmp_path / "cache").iterdir())) == 1
    want = make_dataset(in_memory.tokens, 32, 8, seed=3, held_out=4)
    for t in (0, 1, 17, 500):
        np.testing.assert_array_equal(program.dataset[t], want[t])
    np.testing.assert_array_equal(program.measure.held_out_BxL,
                                  data.held_out_sequences(in_memory.tokens, 32, 4))


def test_held_out_split_feeds_val_loss(shard, tmp_path):
    pretokenize.tokenize_corpus(shard, TOKENIZER, tmp_path / "tok", val_documents=20)
    corpus = TokenCorpus.from_token_files(tmp_path / "tok", 1, 0)
    program = train.LmProgram(LmTrain(data=str(tmp_path / "tok"), seq_len=32, global_batch=8,
                                      val_sequences=3))
    np.testing.assert_array_equal(program.measure.held_out_BxL,
                                  data.held_out_sequences(corpus.held_out, 32, 3))
    trained = np.concatenate([program.dataset[t] for t in range(100)])
    num = data.num_sequences(corpus.tokens, 32)
    assert len(np.unique(trained, axis=0)) == num  # Every train sequence; no held-out one.


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("ordered", [False, True])
def test_resume_mid_epoch_is_exact(tmp_path, ordered):
    _raw(tmp_path / "t.bin", np.arange(30 * L) % 1000, np.uint16)
    tokens = TokenCorpus.from_token_files(tmp_path / "t.bin", 1000, 0, "uint16").tokens
    order = np.random.default_rng(0).integers(0, 30, 60).astype(np.uint32) if ordered else None
    build = lambda: make_dataset(tokens, L, 4, seed=5, order=order)  # noqa: E731
    it = make_iterator(build())
    for _ in range(3):  # An epoch is 7 batches: stop mid-epoch.
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(9)]  # Into the next epoch.
    resumed = make_iterator(build())
    resumed.set_state(state)
    for t, batch in enumerate(expected, 3):
        np.testing.assert_array_equal(next(resumed), batch)
        np.testing.assert_array_equal(batch, build()[t])


# ----------------------------------------------------------------------------- bad input

def test_bad_token_inputs(shard, tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    _config_error(lambda: data.load_token_file(tmp_path / "odd.bin", 512, "uint16"),
                  "odd.bin", "size 3 bytes", "uint16")
    _raw(tmp_path / "raw.bin", [1, 2, 3, 4], np.uint16)
    _config_error(lambda: data.load_token_file(tmp_path / "raw.bin", 512), "raw.bin", "dtype")
    _raw(tmp_path / "big.bin", [1, 2, 700, 4], np.uint16)
    _config_error(lambda: data.load_token_file(tmp_path / "big.bin", 512, "uint16"),
                  "big.bin", "token id 700 at position 2", "512")
    _raw(tmp_path / "order.bin", [0, 5, 6], np.uint32)
    _config_error(lambda: data.load_global_indices(tmp_path / "order.bin", 6),
                  "order.bin", "entry 6 at position 2", "6 training sequences")
    np.save(tmp_path / "neg.npy", np.array([0, -1], np.int64))
    _config_error(lambda: data.load_global_indices(tmp_path / "neg.npy", 6), "entry -1")
    pretokenize.tokenize_corpus(shard, TOKENIZER, tmp_path / "tok")
    other = tmp_path / "other.json"
    other.write_text(TOKENIZER.read_text().replace('"vocab"', '"vocab" ', 1))
    _config_error(lambda: TokenCorpus.from_token_files(tmp_path / "tok", 1, 0, tokenizer=other),
                  "metadata.json", "tokenizer_sha256", str(other))
    with open(tmp_path / "tok" / "train.bin", "ab") as f:
        f.write(b"\0\0")
    _config_error(lambda: TokenCorpus.from_token_files(tmp_path / "tok", 1, 0),
                  "train.bin", "found")


def _bad_inputs(root: pathlib.Path, shard) -> dict[str, tuple[list[str], list[str]]]:
    """name: (gin bindings, fragments of the one error line)."""
    (root / "odd.bin").write_bytes(b"\x01\x00\x02")
    _raw(root / "big.bin", np.r_[np.zeros(999), 600], np.uint16)
    _raw(root / "ok.bin", np.arange(64 * 32) % 512, np.uint16)
    _raw(root / "order.bin", np.r_[np.zeros(99), 64], np.uint32)
    pretokenize.tokenize_corpus(shard, TOKENIZER, root / "tok")
    other = root / "other.json"
    other.write_text(TOKENIZER.read_text().replace('"vocab"', '"vocab" ', 1))
    raw = ["LmTrain.token_dtype = 'uint16'", "LmTrain.val_sequences = 0"]
    return {
        "size": ([f"LmTrain.data = '{root / 'odd.bin'}'", *raw],
                 [str(root / "odd.bin"), "size 3 bytes"]),
        "vocab": ([f"LmTrain.data = '{root / 'big.bin'}'", *raw],
                  [str(root / "big.bin"), "token id 600 at position 999"]),
        "indices": ([f"LmTrain.data = '{root / 'ok.bin'}'", *raw,
                     f"LmTrain.global_indices = '{root / 'order.bin'}'"],
                    [str(root / "order.bin"), "entry 64 at position 99"]),
        "tokenizer": ([f"LmTrain.data = '{root / 'tok'}'", f"LmTrain.tokenizer = '{other}'"],
                      [str(root / "tok" / "metadata.json"), "tokenizer_sha256", str(other)]),
    }


def test_cli_bad_token_input_is_one_line_and_leaves_no_workdir(shard, tmp_path):
    cases = _bad_inputs(tmp_path, shard)
    base = ["LmTrain.seq_len = 32", "LmTrain.global_batch = 8", "LmTrain.num_steps = 12",
            "LmTrain.warmup_steps = 2", "LmTrain.tasks = []"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {}
    for name, (bindings, _) in cases.items():
        argv = [sys.executable, "-m", "rareret.main",
                f"--gin_file={REPO / 'gin_configs' / 'lm' / 'tiny.gin'}",
                *[f"--gin_bindings={b}" for b in base + bindings],
                f"--workdir={tmp_path / ('run-' + name)}"]
        procs[name] = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (name, stderr[-3000:])
        assert lines[0].startswith("rareret: error: "), lines[0]
        for fragment in cases[name][1]:
            assert fragment in lines[0], (name, fragment, lines[0])
        assert not (tmp_path / f"run-{name}").exists(), name


def test_global_indices_need_token_data_and_enough_entries(shard, tmp_path):
    _raw(tmp_path / "order.bin", np.arange(39), np.uint32)
    _raw(tmp_path / "tokens.bin", np.arange(40 * 32) % 500, np.uint16)
    common = dict(seq_len=32, global_batch=4, num_steps=10, warmup_steps=1, val_sequences=0,
                  global_indices=str(tmp_path / "order.bin"))
    _config_error(lambda: train.LmProgram(LmTrain(data=str(shard), **common)),
                  "LmTrain.global_indices", "needs token data")
    _config_error(lambda: train.LmProgram(LmTrain(data=str(tmp_path / "tokens.bin"),
                                                  token_dtype="uint16", **common)),
                  "order.bin", "39 entries", "num_steps × global_batch = 40")
    _config_error(lambda: LmTrain(token_dtype="int8"), "LmTrain.token_dtype='int8'")

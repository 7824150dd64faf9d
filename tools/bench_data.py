"""Memory and speed of the LM data pipeline (issue #16 item 4).

    python tools/bench_data.py [--small-mb 10] [--big-mb 2048] [--steps 30] [--repeats 3]
                               [--text-mb 20]

Builds everything in a temporary folder (removed at the end):
  * two raw uint16 token files (OLMo's headerless format) of random ids < 512, `--small-mb` and
    `--big-mb` megabytes, written through np.memmap;
  * a Dolma shard (`.jsonl`) of `--text-mb` MB of pseudo-words.
Measures:
  * peak RSS: one child process per token file trains the same `cpu-small` model (B=16, L=128,
    a T_CMP and a T_ADD task, `--steps` steps, records at 0 and the end, a checkpoint) through
    `Run(LmProgram(...))`, as the CLI does; its peak RSS comes from `os.wait4` (and, as a
    cross-check, the child's own VmHWM), `--repeats` times per file, alternating; XLA's memory
    varies by up to ~200 MB from run to run, so each file's figure is its run of median peak.
    Goal: the two differ by ≤ 50 MB. Linux counts the peak
    RSS of the parent at the fork into the child's, so the files are written by another child
    and this process stays small until then. Each child's start-up (input checks, among them the
    chunked scan of every token id, and building the program) is timed too.
  * the data pipeline: memory-mapped big file → grain batches (2 prefetch threads) → injection,
    in tokens/s, against the tokens/s of the `cpu-small` train step (`LmModel.step`, timed after
    warm-up). Goal: ≥ 10×.
  * tokenisation (`pretokenize.tokenize_corpus` with the test tokenizer, a 512-id BPE) with 1
    and 2 worker processes, in documents/s and MB/s of input.
Prints a table, then (last) one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "data" / "lm_tokenizer.json"
VOCAB, SEQ_LEN, BATCH = 512, 128, 16


def spec_for(corpus: str, steps: int):
    from rareret.lm import inject
    from rareret.lm.spec import LmTrain

    tasks = (inject.TaskSpec(kind="cmp", name="cmp", frequency_per_token=1e-3, seed=1),
             inject.TaskSpec(kind="add", name="add", every_n=2, seed=2))
    return LmTrain(model="cpu-small", data=corpus, token_dtype="uint16", vocab_size=VOCAB,
                   seq_len=SEQ_LEN, global_batch=BATCH, num_steps=steps, warmup_steps=1,
                   record_every=steps, checkpoint_every=steps, eval_instances=64, tasks=tasks)


def write_tokens(path: pathlib.Path, megabytes: int) -> None:
    count = megabytes * 10**6 // 2
    tokens = np.memmap(path, dtype=np.uint16, mode="w+", shape=(count,))
    rng = np.random.default_rng(0)
    for start in range(0, count, 1 << 24):
        stop = min(count, start + (1 << 24))
        tokens[start:stop] = rng.integers(0, VOCAB, stop - start, dtype=np.uint16)
    tokens.flush()
    del tokens


def write_text(path: pathlib.Path, megabytes: int) -> int:
    """A Dolma shard of pseudo-word documents; returns the number of documents."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an", "el", "bra", "che"]
    lexicon = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(2000)]
    count, size = 0, 0
    with open(path, "w") as f:
        while size < megabytes * 10**6:
            words = rng.choices(lexicon, k=rng.randint(50, 400))
            line = json.dumps({"id": f"d{count}", "text": " ".join(words) + "."}) + "\n"
            f.write(line)
            count, size = count + 1, size + len(line)
    return count


def child_train(corpus: str, workdir: str, steps: int) -> None:
    """A training process, as the CLI runs one; prints its start-up and total seconds."""
    from rareret import host_malloc

    host_malloc.reuse_freed_memory()
    started = time.perf_counter()
    from rareret.lm.train import LmProgram
    from rareret.run import Run

    program = LmProgram(spec_for(corpus, steps))
    startup = time.perf_counter() - started
    Run(program, workdir, show_progress=False).execute()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    print(json.dumps({"startup_s": startup, "total_s": time.perf_counter() - started,
                      "vm_hwm_mb": hwm / 1024}))


def peak_rss(corpus: pathlib.Path, workdir: pathlib.Path, steps: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(corpus), str(workdir),
                             str(steps)], stdout=subprocess.PIPE, env=env, cwd=REPO)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"training child failed on {corpus} (exit {proc.returncode})")
    return {**json.loads(out.decode().strip().splitlines()[-1]),
            "peak_rss_mb": usage.ru_maxrss / 1024}


def pipeline_tokens_per_s(corpus: pathlib.Path, batches: int) -> float:
    from rareret import host_malloc

    host_malloc.reuse_freed_memory()  # As in a training process (before JAX starts).
    from rareret.lm import data, inject

    spec = spec_for(str(corpus), 10)
    tokens = (data.load_token_file(corpus, VOCAB, "uint16", check=False),)  # Scanned above.
    tasks = [inject.build_task(t, VOCAB, reserved=(0,)) for t in spec.tasks]
    injector = inject.Injector(tasks, BATCH, SEQ_LEN, 0, seed=0)
    iterator = data.make_iterator(data.make_dataset(tokens, SEQ_LEN, BATCH, seed=0,
                                                    held_out=16))
    for step in range(20):  # Warm-up: threads started, first pages read.
        injector.inject(next(iterator), step)
    started = time.perf_counter()
    for step in range(20, 20 + batches):
        injector.inject(next(iterator), step)
    return batches * BATCH * SEQ_LEN / (time.perf_counter() - started)


def train_tokens_per_s(steps: int) -> float:
    import jax

    from rareret import sharding
    from rareret.lm.train import LmModel

    spec = spec_for("unused", 100)
    model = LmModel(spec, VOCAB, sharding.make_mesh(spec.mesh))
    state = model.init()
    batch = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ_LEN), dtype=np.int32)
    for _ in range(3):
        state, loss = model.step(state, batch)
    jax.block_until_ready(loss)
    started = time.perf_counter()
    for _ in range(steps):
        state, loss = model.step(state, batch)
    jax.block_until_ready(loss)
    return steps * BATCH * SEQ_LEN / (time.perf_counter() - started)


def tokenize_rate(shard: pathlib.Path, documents: int, out: pathlib.Path, workers: int) -> dict:
    from rareret.lm import pretokenize

    started = time.perf_counter()
    pretokenize.tokenize_corpus(shard, TOKENIZER, out, workers=workers)
    seconds = time.perf_counter() - started
    return {"docs_per_s": documents / seconds, "mb_per_s": shard.stat().st_size / 1e6 / seconds,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-mb", type=int, default=10)
    parser.add_argument("--big-mb", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-mb", type=int, default=20)
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        rows, runs = {}, {"small": [], "big": []}
        for name, megabytes in (("small", args.small_mb), ("big", args.big_mb)):
            started = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--write", str(root / f"{name}.bin"),
                            str(megabytes)], check=True)
            rows[name] = {"mb": megabytes, "write_s": time.perf_counter() - started}
        for i in range(args.repeats):
            for name in runs:
                runs[name].append(peak_rss(root / f"{name}.bin", root / f"run-{name}-{i}",
                                           args.steps))
        for name, results in runs.items():
            rows[name].update(sorted(results, key=lambda r: r["peak_rss_mb"])[len(results) // 2],
                              all_peaks_mb=[round(r["peak_rss_mb"], 1) for r in results])
        pipeline = pipeline_tokens_per_s(root / "big.bin", args.batches)
        train = train_tokens_per_s(20)
        documents = write_text(root / "text.jsonl", args.text_mb)
        tokenize = {f"workers_{w}": tokenize_rate(root / "text.jsonl", documents,
                                                  root / f"tok{w}", w) for w in (1, 2)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    diff = rows["big"]["peak_rss_mb"] - rows["small"]["peak_rss_mb"]
    print(f"{'corpus':>8} {'MB':>6} {'write s':>8} {'peak RSS MB':>12} {'VmHWM MB':>9} "
          f"{'start-up s':>11} {'run s':>7}  every run's peak RSS MB")
    for name, row in rows.items():
        print(f"{name:>8} {row['mb']:>6} {row['write_s']:>8.1f} {row['peak_rss_mb']:>12.1f} "
              f"{row['vm_hwm_mb']:>9.1f} {row['startup_s']:>11.2f} {row['total_s']:>7.1f}  "
              f"{row['all_peaks_mb']}")
    print(f"peak RSS difference: {diff:+.1f} MB (goal ≤ 50)")
    print(f"data pipeline {pipeline:,.0f} tokens/s; cpu-small train step {train:,.0f} tokens/s; "
          f"ratio {pipeline / train:.1f}× (goal ≥ 10)")
    for name, t in tokenize.items():
        print(f"tokenise ({name.replace('_', ' ')}, {args.text_mb} MB, {documents} docs): "
              f"{t['docs_per_s']:,.0f} docs/s, {t['mb_per_s']:.2f} MB/s")
    print(json.dumps({
        "peak_rss_mb": {name: round(row["peak_rss_mb"], 1) for name, row in rows.items()},
        "all_peaks_mb": {name: row["all_peaks_mb"] for name, row in rows.items()},
        "corpus_mb": {name: row["mb"] for name, row in rows.items()},
        "peak_rss_diff_mb": round(diff, 1),
        "startup_s": {name: round(row["startup_s"], 2) for name, row in rows.items()},
        "pipeline_tokens_per_s": round(pipeline), "train_tokens_per_s": round(train),
        "pipeline_over_train": round(pipeline / train, 1),
        "tokenize": {name: {k: round(v, 2) for k, v in t.items()}
                     for name, t in tokenize.items()}}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_train(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif sys.argv[1:2] == ["--write"]:
        write_tokens(pathlib.Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()

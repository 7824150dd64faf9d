"""`rareret-tokenize`: Dolma shards → token memmaps + metadata.json (rareret/lm/pretokenize.py).

    rareret-tokenize --data=SHARDS --tokenizer=tokenizer.json --out=DIR
                     [--val_documents=N] [--workers=W]

SHARDS is a `.json`, `.jsonl`, `.json.gz`, `.json.zst` (…) shard or a folder of them. DIR (new or
empty) receives train.bin, val.bin (the first N documents, held out) and metadata.json; train
on it with `LmTrain.data = 'DIR'` (its held-out split feeds `val_loss`). A progress line goes to
stderr; bad input ends the command with one line `rareret-tokenize: error: ...` and status 2,
leaving DIR as it was.
"""

from __future__ import annotations

import sys

from absl import app, flags

from rareret.errors import ConfigError, one_line, require
from rareret.lm import pretokenize

PROG = "rareret-tokenize"
FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "a Dolma shard or a folder of them.")
flags.DEFINE_string("tokenizer", None, "a HF tokenizers tokenizer.json with <|endoftext|>.")
flags.DEFINE_string("out", None, "output folder (new or empty).")
flags.DEFINE_integer("val_documents", 0, "documents (the first ones) held out for validation.")
flags.DEFINE_integer("workers", None, "tokenising processes (default: 1 below 32 MB of "
                                      "input, else up to 8).")
flags.DEFINE_bool("progress", True, "show a progress line on stderr.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        for name in ("data", "tokenizer", "out"):
            require(getattr(FLAGS, name), f"--{name} is required")
        require(FLAGS.workers is None or FLAGS.workers >= 1,
                f"--workers={FLAGS.workers} must be >= 1")
        meta = pretokenize.tokenize_corpus(FLAGS.data, FLAGS.tokenizer, FLAGS.out,
                                           val_documents=FLAGS.val_documents,
                                           workers=FLAGS.workers, progress=FLAGS.progress)
    except ConfigError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    print(f"{FLAGS.out}: {meta['documents']['train']} + {meta['documents']['val']} held-out "
          f"documents, {meta['tokens']['train']} + {meta['tokens']['val']} {meta['dtype']} "
          f"tokens")


def run_main() -> None:
    app.run(main)


if __name__ == "__main__":
    run_main()

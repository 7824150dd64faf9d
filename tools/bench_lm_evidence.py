"""Wall-time overhead of the LM evidence records (probes, MLP ablation and gradient interference
every 100 steps; goal ≤ 10%) on a `cpu-small` run.

Two runs of the same spec in this one process, through `rareret.run.Run` as the `rareret`
command drives them (training, records, metric writes, checkpoints): one with
`probe_every = interference_every = --every`, one without (both record task loss, accuracy and
val_loss every `--every` steps). They advance in lockstep, one block of `--every` steps at a
time, alternating which goes first, so the machine's drift stays out of the ratio; the first
block (compilation) is not counted. Data: the embedded corpus (tokenizer trained once, shared).

    python tools/bench_lm_evidence.py [--steps 1000] [--every 100] [--model cpu-small]

Prints a table, then one JSON line with `evidence_overhead`: the median over blocks of
(seconds with ÷ seconds without) − 1, and `total_ratio_overhead` from the summed times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile

import numpy as np

from rareret import host_malloc

host_malloc.reuse_freed_memory()  # As the `rareret` command does, before JAX starts.

from rareret.lm import inject  # noqa: E402
from rareret.lm.spec import LmTrain  # noqa: E402
from rareret.lm.train import LmProgram  # noqa: E402
from rareret.run import Run  # noqa: E402

from bench_interference import lockstep  # noqa: E402  (tools/ is the script's directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--model", default="cpu-small")
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}")
    tasks = (inject.TaskSpec(kind="cmp", name="cmp", frequency_per_token=1e-3, seed=1),
             inject.TaskSpec(kind="add", name="add", every_n=2, seed=2))
    with tempfile.TemporaryDirectory() as root:
        tokenizer = os.path.join(root, "tokenizer.json")
        base = LmTrain(model=args.model, seq_len=128, global_batch=16, num_steps=args.steps,
                       warmup_steps=min(100, args.steps - 1), learning_rate=3e-3,
                       record_every=args.every, checkpoint_every=args.steps, tasks=tasks)
        variants = {"without evidence": base,
                    f"probes + interference every {args.every}": dataclasses.replace(
                        base, probe_every=args.every, interference_every=args.every)}
        runs = {}
        for i, (name, spec) in enumerate(variants.items()):
            if os.path.exists(tokenizer):  # The first run trained it: share it.
                spec = dataclasses.replace(spec, tokenizer=tokenizer)
            run = Run(LmProgram(spec), os.path.join(root, str(i)), show_progress=False)
            run.start()
            trained = os.path.join(root, str(i), "tokenizer.json")
            if not os.path.exists(tokenizer) and os.path.exists(trained):
                os.link(trained, tokenizer)
            runs[name] = run
        without, with_ = lockstep(runs, list(range(args.every, args.steps + 1, args.every)))
    overhead = statistics.median(with_ / without) - 1
    total = with_.sum() / without.sum() - 1
    print(f"\n{'variant':<40} {'total s':>8} {'median block s':>15}")
    for name, values in zip(runs, (without, with_)):
        print(f"{name:<40} {values.sum():8.2f} {np.median(values):15.3f}")
    print(f"\nper-block overhead: median {overhead:+.2%} over {len(without)} blocks; summed "
          f"times {total:+.2%} ({args.model}, B=16, L=128, {args.steps} steps)")
    print(json.dumps({"evidence_overhead": round(overhead, 4),
                      "total_ratio_overhead": round(total, 4), "blocks": len(without),
                      "steps": args.steps, "every": args.every, "model": args.model}))


if __name__ == "__main__":
    main()

"""Wall-time overhead of recording gradient interference every 100 steps (issue: goal ≤ 5%).

Trains the default CPU sweep (gin_configs/synthetic/default.gin: 20K steps unless --steps) twice
in this one process, as the `rareret` command does (`rareret.run.Run` advanced one record at a
time: training, metric records, tensorstore writes, checkpoints, one BLAS thread): once as configured and once with
`Sweep.interference_every = 100`. The two runs advance in lockstep, taking turns one block of
`record_every` steps at a time (the order alternates between blocks), and each block ends once
its records are stored. On a machine whose speed drifts within seconds, comparing neighbouring
blocks is what keeps the drift out of the ratio. The first block (compilation) is not counted.

    python tools/bench_interference.py [--steps N] [--every 100] [--mode population]

Prints a table, then one JSON line with `interference_overhead`: the median over blocks of
(seconds with ÷ seconds without) − 1; `total_ratio_overhead` is the same from the summed times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import gin
import numpy as np

from rareret.blas_threads import single_threaded_blas
from rareret.run import Run
from rareret.synthetic.sweep import SweepProgram
from rareret.synthetic.spec import INTERFERENCE_MODES, Sweep, TaskMixture

DEFAULT_GIN = os.path.join(os.path.dirname(__file__), "..", "gin_configs", "synthetic",
                           "default.gin")


def default_specs() -> tuple[TaskMixture, Sweep]:
    """The specs default.gin binds (parsed with gin, so the benchmark follows the config)."""
    mixture_cls = gin.external_configurable(TaskMixture, name="TaskMixture")
    sweep_cls = gin.external_configurable(Sweep, name="Sweep")
    gin.parse_config_files_and_bindings([DEFAULT_GIN], ["run.experiment = 'synthetic'"],
                                        skip_unknown=True)
    return mixture_cls(), sweep_cls()


def timed_block(run: Run, end: int) -> float:
    """Seconds to train `run` to step `end` and store its records."""
    start = time.perf_counter()
    while run.step < end:
        run.advance()
    run.fetch()
    return time.perf_counter() - start


def lockstep(runs: dict[str, Run], ends: list[int]) -> list[np.ndarray]:
    """Advances started runs to each step of `ends` in turn, alternating which goes first, then
    finishes them; per run, the seconds of each block but the first (compilation)."""
    seconds = {name: [] for name in runs}
    for block, end in enumerate(ends):
        order = list(runs) if block % 2 == 0 else list(runs)[::-1]
        for name in order:
            seconds[name].append(timed_block(runs[name], end))
    for run in runs.values():
        run.finish()
        run.close()
    return [np.asarray(values[1:]) for values in seconds.values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="default: the config's Sweep.num_steps")
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--mode", default="population", choices=INTERFERENCE_MODES)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}")
    mixture, base = default_specs()
    base = dataclasses.replace(base, num_steps=args.steps or base.num_steps)
    variants = {"without interference": base,
                f"interference every {args.every} ({args.mode})": dataclasses.replace(
                    base, interference_every=args.every, interference_mode=args.mode)}
    ends = list(range(base.record_every, base.num_steps, base.record_every)) + [base.num_steps]
    with tempfile.TemporaryDirectory() as root, single_threaded_blas():
        runs = {name: Run(SweepProgram(mixture, spec), os.path.join(root, str(i)),
                          show_progress=False)
                for i, (name, spec) in enumerate(variants.items())}
        for run in runs.values():
            run.start()
        without, with_ = lockstep(runs, ends)
    overhead = statistics.median(with_ / without) - 1
    total_overhead = with_.sum() / without.sum() - 1
    print(f"\n{'variant':<40} {'total s':>8} {'median block s':>15}")
    for name, values in zip(variants, (without, with_)):
        print(f"{name:<40} {values.sum():8.2f} {np.median(values):15.3f}")
    quartiles = np.percentile(with_ / without - 1, [25, 75])
    print(f"\nper-block overhead: median {overhead:+.2%}, quartiles {quartiles[0]:+.2%} "
          f"{quartiles[1]:+.2%} over {len(without)} blocks; summed times {total_overhead:+.2%}")
    print(f"shapes: widths {list(base.widths)}, K={mixture.num_tasks}, d_T={mixture.task_dim}, "
          f"D={mixture.input_dim}, B={base.batch_size}, {base.num_steps} steps, "
          f"record_every={base.record_every}")
    print(json.dumps({"interference_overhead": round(overhead, 4),
                      "total_ratio_overhead": round(total_overhead, 4),
                      "blocks": len(without), "steps": base.num_steps, "every": args.every,
                      "mode": args.mode}))


if __name__ == "__main__":
    main()

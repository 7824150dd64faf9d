"""Wall-time overhead of recording gradient interference every 100 steps (issue: goal ≤ 5%).

Runs the default CPU sweep (gin_configs/synthetic/default.gin: 20K steps unless --steps) end
to end through `run_sweep` (training, metric records, tensorstore writes) with and without
`Sweep.interference_every = 100`, alternating the two several times in this one process, and
reports median wall times and their ratio. Every run builds its program anew, so a persistent
compilation cache (filled by a warm-up run of each variant) keeps XLA compile time out of the
timed runs.

    python tools/bench_interference.py [--steps N] [--repeats 3] [--mode population]

Prints a table, then one JSON line with `interference_overhead` (median with / median without − 1).
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
import jax

from rareret.synthetic import runner, sweep, tasks

DEFAULT_GIN = os.path.join(os.path.dirname(__file__), "..", "gin_configs", "synthetic",
                           "default.gin")


def default_specs() -> tuple[tasks.TaskMixture, sweep.Sweep]:
    """The specs default.gin binds (parsed with gin, so the benchmark follows the config)."""
    mixture_cls = gin.external_configurable(tasks.TaskMixture, name="TaskMixture")
    sweep_cls = gin.external_configurable(sweep.Sweep, name="Sweep")
    gin.parse_config_files_and_bindings([DEFAULT_GIN], ["run.experiment = 'synthetic'"],
                                        skip_unknown=True)
    return mixture_cls(), sweep_cls()


def timed_run(mixture, spec) -> float:
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        runner.run_sweep(mixture, spec, workdir, show_progress=False)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="default: the config's Sweep.num_steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--mode", default="population", choices=sweep.INTERFERENCE_MODES)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}")
    cache = tempfile.mkdtemp(prefix="rareret_bench_cache_")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    mixture, base = default_specs()
    base = dataclasses.replace(base, num_steps=args.steps or base.num_steps)
    variants = {"without interference": base,
                f"interference every {args.every} ({args.mode})": dataclasses.replace(
                    base, interference_every=args.every, interference_mode=args.mode)}
    for spec in variants.values():  # Warm-up: compiles every program once, into the cache.
        timed_run(mixture, spec)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, spec in variants.items():
            times[name].append(timed_run(mixture, spec))
    medians = {name: statistics.median(values) for name, values in times.items()}
    without, with_ = medians.values()
    print(f"\n{'variant':<40} {'median s':>9} {'runs (s)':>30}")
    for name, values in times.items():
        print(f"{name:<40} {medians[name]:9.2f} {' '.join(f'{v:.2f}' for v in values):>30}")
    overhead = with_ / without - 1
    print(f"\nshapes: widths {list(base.widths)}, K={mixture.num_tasks}, d_T={mixture.task_dim}, "
          f"D={mixture.input_dim}, B={base.batch_size}, {base.num_steps} steps, "
          f"record_every={base.record_every}")
    print(json.dumps({"interference_overhead": round(overhead, 4), "steps": base.num_steps,
                      "every": args.every, "mode": args.mode,
                      "median_s_without": round(without, 3), "median_s_with": round(with_, 3)}))


if __name__ == "__main__":
    main()

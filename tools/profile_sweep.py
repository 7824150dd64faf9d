"""Where a packed sweep-step's time goes: XLA's executed instructions, grouped by stage.

    python tools/profile_sweep.py [--seeds=4] [--steps=100] [bench_sweep.py's shape flags]
    python tools/profile_sweep.py --paper --seeds=1 --steps=20   # the paper's shapes

Traces --steps training steps of the packed sweep at bench_sweep.py's shapes (by default K=16,
d_T=16, D=256, B=512, widths 2…64; `--paper`: K=32, d_T=32, D=1024, B=1024, widths 2…256) with
jax.profiler and sums the time of every executed HLO instruction by the named scope of the code
that emitted it: `batch` (inputs, task ids, targets, task tiles), `encoder` (the packed encoder
GEMM and its weight gradient), `decoder` (task tiles, decoder GEMMs, loss), `optimizer` (clipping,
AdamW, divergence checks). Backward instructions carry the scope of their forward pass;
instructions with none are XLA's own copies. Loop and branch instructions are not counted (their
bodies are).

Busy time is measured under the tracer (which slows the step; both wall times are printed) and
sums both cores, so it can exceed the wall time. The last column estimates the gemm_fraction
(bench_sweep.py's definition, at the GEMM rate measured here) the step would reach if that stage
cost nothing, taking the untraced wall time to shrink by the stage's share of all busy time. The
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import statistics
import tempfile
import time

import jax

# tools/, this script's directory, is on sys.path.
from bench_sweep import add_shape_flags, encoder_gemm, specs, useful_flops
from rareret.synthetic import sweep as sweep_lib

STAGES = ("batch", "encoder", "decoder", "optimizer")
UNSCOPED = "(XLA copies, no scope)"
SCOPE = re.compile(r"(?:^|[/(])(" + "|".join(STAGES) + r")(?:[)/]|$)")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
CONTAINER = re.compile(r"\s(?:while|conditional|call)\(")  # Their bodies' thunks are counted.
OP_NAME = re.compile(r'op_name="([^"]*)"')


def instruction_stages(hlo_text: str) -> dict[str, str]:
    """Stage of every non-container instruction of a compiled module, by instruction name."""
    stages = {}
    for line in hlo_text.splitlines():
        match = INSTRUCTION.match(line)
        if not match or CONTAINER.search(match.group(2)):
            continue
        op_name = OP_NAME.search(match.group(2))
        scope = SCOPE.search(op_name.group(1)) if op_name else None
        stages[match.group(1)] = scope.group(1) if scope else UNSCOPED
    return stages


def busy_seconds(trace_dir: str, stages: dict[str, str]) -> tuple[dict, dict]:
    """Per stage, the summed duration and count of the traced instruction executions."""
    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    seconds, counts = collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                stage = stages.get(event.name)
                if stage:
                    seconds[stage] += event.duration_ns * 1e-9
                    counts[stage] += 1
    return seconds, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_flags(parser)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    if args.steps < 1:
        parser.exit(2, f"{parser.prog}: error: --steps={args.steps} must be ≥ 1\n")

    mixture, sweeps = specs(args, [args.seeds])
    spec = sweeps[args.seeds]
    program = sweep_lib.SweepProgram(mixture, spec)
    state = jax.block_until_ready(program.train_chunk(program.init(), args.steps, 0))
    stages = instruction_stages(program.train_chunk.lower(state, args.steps, 0).compile().as_text())
    start = time.perf_counter()
    state = jax.block_until_ready(program.train_chunk(state, args.steps, args.steps))
    wall = (time.perf_counter() - start) / args.steps
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            jax.block_until_ready(program.train_chunk(state, args.steps, 2 * args.steps))
            traced_wall = (time.perf_counter() - start) / args.steps
        seconds, counts = busy_seconds(trace_dir, stages)

    gemm = encoder_gemm(spec, mixture)
    gemm_rate = statistics.median(gemm.run() for _ in range(3))
    flops = useful_flops(spec, mixture)

    print(f"jax {jax.__version__} on {jax.default_backend()}; widths {list(spec.widths)} × "
          f"{args.seeds} seeds; wall {wall * 1e3:.3f} ms/step (traced: {traced_wall * 1e3:.3f}), "
          f"gemm_fraction {flops / wall / gemm_rate:.3f} at {gemm_rate / 1e9:.0f} GFLOP/s\n")
    print(f"{'stage':<26}{'busy ms/step':>13}{'share':>8}{'instr/step':>12}"
          f"{'gemm_fraction if free':>23}")
    total = sum(seconds.values())
    summary = {}
    for stage in (*STAGES, UNSCOPED):
        busy, share = seconds[stage] / args.steps, seconds[stage] / total
        ceiling = flops / (wall * (1 - share)) / gemm_rate
        summary[stage] = {"busy_ms": round(busy * 1e3, 4), "share": round(share, 4),
                          "ceiling": round(ceiling, 3)}
        print(f"{stage:<26}{busy * 1e3:>13.3f}{share:>8.1%}"
              f"{counts[stage] / args.steps:>12.1f}{ceiling:>23.3f}")
    print(json.dumps({"wall_ms_per_step": round(wall * 1e3, 4),
                      "traced_wall_ms_per_step": round(traced_wall * 1e3, 4),
                      "gemm_fraction": round(flops / wall / gemm_rate, 4),
                      "gemm_gflops_encoder_shape": round(gemm_rate / 1e9, 2),
                      "stages": summary}))


if __name__ == "__main__":
    main()

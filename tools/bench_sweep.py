"""Throughput of the packed width sweep against per-model JAX and PyTorch loops, on CPU.

    python tools/bench_sweep.py [--seed_counts=1,4] [--reps=7] [--widths=2,4,8,16,32,64]
    python tools/bench_sweep.py --paper --methods=packed   # the paper's shapes, packed only

The default shapes are the ones the issue names: the default config's mixture and batch
(gin_configs/synthetic/default.gin: K=16 tasks, d_T=16, D=256, B=512, lr 3e-3, 1000 warm-up
steps) with widths 2, 4, …, 64, at 1 and 4 seeds. `--paper` takes the paper's instead
(gin_configs/synthetic/paper_phase.gin: K=32, d_T=32, D=1024, B=1024, β=2, lr 1e-3, widths
2…256); it overrides the shape flags. `--methods` picks which of three methods train the models:

  packed      `SweepProgram.train_chunk`: every model of the sweep in one jitted loop over steps.
  jax loop    one jitted single-model `SweepProgram` per width, run model after model.
  torch loop  per model an nn.Module, AdamW, clip_grad_norm_(1.0) and an inverse-sqrt LambdaLR,
              run model after model on torch.set_num_threads(--torch_threads) (2: this machine's
              cores), each drawing its batches with torch on the CPU.

The unit is the sweep-step: one optimiser step of EVERY model of the sweep (all widths × seeds); a
loop's time per sweep-step is the sum over its models of each model's time per step. Useful work
per sweep-step counts each model's GEMMs at its true width N_m (no padded units, no input
gradient, no optimiser or elementwise work):

    FLOPs = Σ_m [2·B·D·N_m (encoder fwd) + 2·B·N_m·T (own-task decoder fwd)
                 + 2·B·D·N_m (encoder weight grad) + 2·B·N_m·T (hidden grad)
                 + 2·B·N_m·T (decoder grad)]
          = Σ_m (4·B·D·N_m + 6·B·N_m·T).

gemm_fraction = useful FLOP/s ÷ the FLOP/s of XLA's GEMM (on JAX's default backend) of the
sweep's encoder shape [B, D] @ [D, ΣN] (ΣN over all of the sweep's models), measured in this
process, interleaved with the runs. Each figure is the median over --reps repetitions; the
methods take turns within each repetition. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rareret.errors import ConfigError, one_line
from rareret.synthetic import sweep as sweep_lib
from rareret.synthetic.spec import Sweep, TaskMixture

try:
    import torch
except ImportError:  # The optional extra `torch`; without it the torch loop is skipped.
    torch = None

GEMM_FLOPS_PER_TIMING = 2e10  # GEMM work per rate measurement (a fraction of a second on CPU).
METHODS = ("packed", "jax loop", "torch loop")
# gin_configs/synthetic/paper_phase.gin's shapes (tests/test_bench_sweep.py checks they agree).
PAPER = {"widths": (2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256), "num_tasks": 32, "task_dim": 32,
         "input_dim": 1024, "batch_size": 1024, "beta": 2.0, "learning_rate": 1e-3,
         "warmup_steps": 1000}


def useful_flops(sweep: Sweep, mixture: TaskMixture) -> float:
    """Σ_m (4·B·D·N_m + 6·B·N_m·T): each model's GEMM work at its true width."""
    total_width = sum(sweep.widths) * len(sweep.seeds) * len(sweep.learning_rates)
    batch, dim, task_dim = sweep.batch_size, mixture.input_dim, mixture.task_dim
    return float(total_width * (4 * batch * dim + 6 * batch * task_dim))


class Packed:
    """The packed sweep, timed one chunk of `chunk` steps at a time."""

    def __init__(self, mixture: TaskMixture, sweep: Sweep, chunk: int):
        self.program = sweep_lib.SweepProgram(mixture, sweep)
        self.state, self.chunk, self.step = self.program.init(), chunk, 0
        self.run()  # Compiles.

    def run(self) -> float:
        """Seconds per sweep-step over one chunk."""
        start = time.perf_counter()
        out = jax.block_until_ready(self.program.train_chunk(self.state, self.chunk, self.step))
        elapsed = time.perf_counter() - start
        self.state, self.step = out, self.step + self.chunk
        return elapsed / self.chunk


class JaxLoop:
    """Separate single-model runs, one after another, on the packed sweep's batches.

    Each model is initialised as in the packed sweep; a seed sets only the init, so the models of
    a width share that width's jitted program.
    """

    def __init__(self, mixture: TaskMixture, sweep: Sweep, chunk: int):
        self.chunk, self.step = chunk, 0
        one = lambda width, seed: dataclasses.replace(sweep, widths=(width,), seeds=(seed,))
        self.programs = [sweep_lib.SweepProgram(mixture, one(width, 0)) for width in sweep.widths]
        self.states = [[sweep_lib.SweepProgram(mixture, one(width, seed)).init()
                        for seed in sweep.seeds] for width in sweep.widths]
        self.run()  # Compiles.

    def run(self) -> np.ndarray:
        """Seconds per step of each model over one chunk, [widths, seeds]."""
        seconds = np.zeros((len(self.states), len(self.states[0])))
        for w, (program, row) in enumerate(zip(self.programs, self.states)):
            for s, state in enumerate(row):
                start = time.perf_counter()
                out = jax.block_until_ready(program.train_chunk(state, self.chunk, self.step))
                seconds[w, s] = (time.perf_counter() - start) / self.chunk
                row[s] = out
        self.step += self.chunk
        return seconds


class TorchLoop:
    """Per model, the straightforward PyTorch toy: Linear encoder, gathered per-task decoders."""

    def __init__(self, mixture: TaskMixture, sweep: Sweep, steps: int):
        self.mixture, self.sweep, self.steps = mixture, sweep, steps
        self.priors_K = torch.tensor(mixture.prior_array(), dtype=torch.float32)
        self.sqrt_spectra_KxT = torch.tensor(np.sqrt(mixture.spectra()), dtype=torch.float32)
        self.rows_B = torch.arange(sweep.batch_size)
        self.models = [[self._model(width, seed) for seed in sweep.seeds]
                       for width in sweep.widths]
        for model in (m for row in self.models for m in row):  # Warms up allocators, kernels.
            for _ in range(3):
                self._step(*model)

    def _model(self, width: int, seed: int):
        mix = self.mixture
        generator = torch.Generator().manual_seed(1000 * seed + width)
        net = torch.nn.Module()
        net.encoder = torch.nn.Linear(mix.input_dim, width, bias=False)
        torch.nn.init.orthogonal_(net.encoder.weight, generator=generator)
        bound = 1.0 / np.sqrt(width)
        net.decoders = torch.nn.Parameter(torch.empty(mix.num_tasks, mix.task_dim, width)
                                          .uniform_(-bound, bound, generator=generator))
        opt = torch.optim.AdamW(net.parameters(), lr=self.sweep.learning_rate, betas=(0.9, 0.999),
                                eps=1e-8, weight_decay=self.sweep.weight_decay)
        warmup = float(max(self.sweep.warmup_steps, 1))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min((step + 1) / warmup, (warmup / (step + 1)) ** 0.5))
        return net, opt, sched, generator

    def _step(self, net, opt, sched, generator) -> None:
        mix, batch = self.mixture, self.sweep.batch_size
        x_BxD = torch.randn(batch, mix.input_dim, generator=generator)
        task_B = torch.multinomial(self.priors_K, batch, replacement=True, generator=generator)
        blocks_BxKxT = x_BxD[:, :mix.num_tasks * mix.task_dim].view(batch, mix.num_tasks, -1)
        y_BxT = blocks_BxKxT[self.rows_B, task_B] * self.sqrt_spectra_KxT[task_B]
        pred_BxT = torch.einsum("btn,bn->bt", net.decoders[task_B], net.encoder(x_BxD))
        loss = torch.nn.functional.mse_loss(pred_BxT, y_BxT)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()

    def run(self) -> np.ndarray:
        """Seconds per step of each model over `steps` steps, [widths, seeds]."""
        seconds = np.zeros((len(self.models), len(self.models[0])))
        for w, row in enumerate(self.models):
            for s, model in enumerate(row):
                start = time.perf_counter()
                for _ in range(self.steps):
                    self._step(*model)
                seconds[w, s] = (time.perf_counter() - start) / self.steps
        return seconds


class Gemm:
    """FLOP/s of XLA's GEMM [m, k] @ [k, n], cycling over 8 inputs (nothing to hoist)."""

    def __init__(self, m: int, k: int, n: int):
        key_x, key_w = jax.random.split(jax.random.key(0))
        self.xs = jax.random.normal(key_x, (8, m, k), jnp.float32)
        self.w = jax.random.normal(key_w, (k, n), jnp.float32)
        self.flops = 2.0 * m * k * n
        self.count = max(8, int(GEMM_FLOPS_PER_TIMING / self.flops))

        def loop(xs, w):
            body = lambda i, acc: acc + xs[i % xs.shape[0]] @ w
            return jax.lax.fori_loop(0, self.count, body, jnp.zeros((m, n), jnp.float32))

        self.loop = jax.jit(loop)
        self.run()  # Compiles.

    def run(self) -> float:
        start = time.perf_counter()
        jax.block_until_ready(self.loop(self.xs, self.w))
        return self.count * self.flops / (time.perf_counter() - start)


def load_average() -> str:
    return "load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def add_shape_flags(parser: argparse.ArgumentParser) -> None:
    """The benchmark's mixture and sweep shapes (the issue's: see the module docstring)."""
    parser.add_argument("--paper", action="store_true",
                        help="the paper's shapes (paper_phase.gin); overrides the shape flags")
    parser.add_argument("--widths", type=int_list, default=(2, 4, 8, 16, 32, 64))
    parser.add_argument("--num_tasks", type=int, default=16)
    parser.add_argument("--task_dim", type=int, default=16)
    parser.add_argument("--input_dim", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--beta", type=float, default=1.5, help="task prior exponent")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--warmup_steps", type=int, default=1000)


def specs(args: argparse.Namespace, seed_counts) -> tuple[TaskMixture, dict]:
    """The mixture and one sweep per seed count; a bad value exits with one line. With
    `--paper` set, `args` takes the paper's shapes first."""
    if args.paper:
        vars(args).update(PAPER)
    try:
        mixture = TaskMixture(num_tasks=args.num_tasks, task_dim=args.task_dim,
                                    input_dim=args.input_dim, beta=args.beta, alpha=2.0)
        sweeps = {n: Sweep(widths=args.widths, seeds=tuple(range(n)),
                                     learning_rate=args.learning_rate,
                                     warmup_steps=args.warmup_steps, batch_size=args.batch_size)
                  for n in seed_counts}
        for sweep in sweeps.values():
            sweep.check_against(mixture)
    except ConfigError as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {one_line(e)}")
    return mixture, sweeps


def encoder_gemm(sweep: Sweep, mixture: TaskMixture) -> Gemm:
    """The gemm_fraction's denominator: XLA's GEMM [B, D] @ [D, ΣN]."""
    total_width = sum(sweep.widths) * len(sweep.seeds) * len(sweep.learning_rates)
    return Gemm(sweep.batch_size, mixture.input_dim, total_width)


def method_list(text: str) -> tuple[str, ...]:
    """`--methods`: names with "_" for " ", kept in METHODS' order; "packed" is required."""
    names = {name.strip().replace("_", " ") for name in text.split(",")}
    if not names <= set(METHODS) or "packed" not in names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected packed plus any of jax_loop, torch_loop")
    return tuple(m for m in METHODS if m in names)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_flags(parser)
    parser.add_argument("--seed_counts", type=int_list, default=(1, 4),
                        help="seeds per width; each count is its own sweep")
    parser.add_argument("--methods", type=method_list, default=METHODS,
                        help="comma-separated, of: " + ", ".join(m.replace(" ", "_")
                                                              for m in METHODS))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of every method")
    parser.add_argument("--chunk", type=int, default=200, help="steps per packed timing")
    parser.add_argument("--loop_chunk", type=int, default=50,
                        help="steps per timing of each jax-loop model")
    parser.add_argument("--torch_steps", type=int, default=20,
                        help="steps per timing of each torch-loop model")
    parser.add_argument("--torch_threads", type=int, default=2,
                        help="torch.set_num_threads (this machine has 2 cores)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    wall_start = time.perf_counter()
    counts = sorted(args.seed_counts)
    mixture, sweeps = specs(args, counts)
    largest = sweeps[counts[-1]]
    print(load_average())
    if os.getloadavg()[0] > os.cpu_count():
        print(f"warning: load above {os.cpu_count()} CPUs; timings are unreliable, torch's OpenMP "
              f"threads most of all (try --torch_threads=1)")
    run_torch = torch is not None and "torch loop" in args.methods
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs; "
          + (f"torch {torch.__version__} with torch.set_num_threads({args.torch_threads})"
             if torch else "torch not installed: torch loop skipped"))
    print(f"shapes: K={mixture.num_tasks} d_T={mixture.task_dim} D={mixture.input_dim} "
          f"B={args.batch_size} widths={list(args.widths)} seeds={counts}; methods "
          f"{', '.join(args.methods)}; per rep: packed {args.chunk} steps, jax loop "
          f"{args.loop_chunk} and torch loop {args.torch_steps} steps per model; {args.reps} reps",
          flush=True)

    if run_torch:
        torch.set_num_threads(args.torch_threads)
    setup_s = {}

    def built(name, make):
        start = time.perf_counter()
        out = make()
        setup_s[name] = time.perf_counter() - start
        return out

    batch, dim = args.batch_size, mixture.input_dim
    packed = built("packed", lambda: {n: Packed(mixture, sweeps[n], args.chunk) for n in counts})
    loops = []
    if "jax loop" in args.methods:
        loops.append(("jax loop", built("jax loop",
                                        lambda: JaxLoop(mixture, largest, args.loop_chunk))))
    if run_torch:
        loops.append(("torch loop", built("torch loop", lambda: TorchLoop(
            mixture, largest, args.torch_steps))))
    gemms = built("gemm", lambda: {n: encoder_gemm(sweeps[n], mixture) for n in counts})
    square = built("square gemm", lambda: Gemm(1024, 1024, 1024))
    print("init, compile and warm-up (s): "
          + ", ".join(f"{name} {s:.1f}" for name, s in setup_s.items()), flush=True)

    seconds = {(method, n): [] for method in args.methods for n in counts}
    rates = {n: [] for n in counts}
    square_rates = []
    for _ in range(args.reps):
        for n in counts:
            seconds["packed", n].append(packed[n].run())
            rates[n].append(gemms[n].run())
        square_rates.append(square.run())
        for method, loop in loops:
            per_model = loop.run()
            for n in counts:  # The n-seed loop runs the models of seeds 0…n−1.
                seconds[method, n].append(float(per_model[:, :n].sum()))

    step_s = {key: statistics.median(v) if v else None for key, v in seconds.items()}
    gemm_rate = {n: statistics.median(rates[n]) for n in counts}
    header = (f"{'method':<11}{'seeds':>6}{'models':>7}{'sweep-steps/s':>15}{'ms/sweep-step':>15}"
              f"{'useful GFLOP/s':>16}{'gemm fraction':>15}{'packed speedup':>16}")
    print(f"\n{header}\n{'-' * len(header)}")
    summary, rows = {}, {}
    for n in counts:
        flops = useful_flops(sweeps[n], mixture)
        suffix = "" if n == counts[-1] else f"_{n}seed"
        packed_s = step_s["packed", n]
        for method in args.methods:
            s = step_s[method, n]
            name = method.replace(" ", "_")
            if s is None:
                print(f"{method:<11}{n:>6}{len(args.widths) * n:>7}  skipped: torch not installed")
                rows[f"{name}_{n}seed"] = None
            else:
                print(f"{method:<11}{n:>6}{len(args.widths) * n:>7}{1 / s:>15.1f}{1e3 * s:>15.2f}"
                      f"{flops / s / 1e9:>16.1f}{flops / s / gemm_rate[n]:>15.3f}"
                      f"{s / packed_s:>16.2f}")
                rows[f"{name}_{n}seed"] = round(1 / s, 2)
            if method != "packed":
                speedup = None if s is None else round(s / packed_s, 3)
                summary[f"speedup_vs_{name}{suffix}"] = speedup
        summary[f"gemm_fraction{suffix}"] = round(flops / packed_s / gemm_rate[n], 4)
        summary[f"gemm_gflops_encoder_shape{suffix}"] = round(gemm_rate[n] / 1e9, 2)
        summary[f"useful_gflop_per_sweep_step{suffix}"] = round(flops / 1e9, 5)
    print(f"\ngemm fraction = useful FLOP/s ÷ XLA's {jax.default_backend().upper()} GEMM FLOP/s "
          f"at the encoder's shape:")
    for n in counts:
        print(f"  {n} seed(s): [{batch}, {dim}] @ [{dim}, {sum(args.widths) * n}] at "
              f"{gemm_rate[n] / 1e9:.1f} GFLOP/s; useful work "
              f"{useful_flops(sweeps[n], mixture) / 1e9:.4f} GFLOP per sweep-step")
    square_rate = statistics.median(square_rates)
    print(f"  reference: square GEMM 1024^3 at {square_rate / 1e9:.1f} GFLOP/s")
    print(load_average())
    summary.update({
        "gemm_gflops_square_1024": round(square_rate / 1e9, 2),
        "gemm_fraction_denominator": f"XLA {jax.default_backend().upper()} GEMM [B, D] @ "
                                     f"[D, sum of the sweep's widths]",
        "sweep_steps_per_s": rows, "seeds": counts[-1], "widths": list(args.widths),
        "methods": [m.replace(" ", "_") for m in args.methods],
        "torch": torch.__version__ if run_torch else None,
        "torch_threads": args.torch_threads if run_torch else None,
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "wall_s": round(time.perf_counter() - wall_start, 1)})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Train tokens/s of the rareret LM step vs a PyTorch loop of HF `OlmoForCausalLM`, plus MFU.

    python tools/bench_lm.py [--model cpu-small] [--seq-len 128] [--batch 16] [--reps 7]
    python tools/bench_lm.py --device gpu [--models 20M 300M] [--seq-len 1024] [--batch 32]

CPU mode (issue goal: rareret ≥ 1.5× the PyTorch loop). Both sides train the same model from the
same initial weights on the same fixed batch of random tokens [B, L], in this one process:
  * rareret: `LmModel(spec, vocab, mesh)`'s jitted, sharded train step (next-token loss, global
    clip 1.0, AdamW β = (0.9, 0.95), ε = 1e-8, decoupled weight decay 0.1, warm-up + cosine
    learning rate), state donated, called through `LmModel.step` as the training loop does.
  * PyTorch: `hf_interop.to_hf_model(config, params)` on rareret's initial params (so the shapes
    and weights agree exactly), in train mode, `torch.optim.AdamW` with the same lr, betas, eps
    and weight decay (constant lr: a schedule costs nothing), and a plain loop: forward with
    labels → loss.backward() → clip_grad_norm_(1.0) → step() → zero_grad().
The process is pinned to `--cpus` CPUs (default 2) and torch uses as many threads
(`torch.set_num_threads`), so XLA's and torch's thread pools get the same cores. torch's OpenMP
pool runs with OMP_WAIT_POLICY=PASSIVE unless `--omp-wait-policy` says otherwise: with the default
(spinning) policy, on a machine whose cores are shared with other work, two-thread MKL GEMMs ran
several times slower than one-thread ones, which flatters the speedup (`--omp-wait-policy
inherit` keeps the environment's policy). After a warm-up (compilation, first steps), each of
`--reps` repetitions times a block of `--steps` steps of each side in turn (JAX blocks end with
block_until_ready), then the GEMM probes below; every figure is the median over repetitions.
The first-step losses of the two sides are printed: equal, they show that both train the same
model on the same batch. Like the CLI's LM runs, the process first sets glibc malloc to reuse
freed memory (`rareret.host_malloc`); torch allocates through the same malloc, so both sides run
under it.

GPU mode (issue goal: MFU ≥ 45% at 300M on an H100): rareret alone, at the `--models` rungs
(default 20M and 300M) with bfloat16 compute (float32 params and optimiser state) and cuDNN flash
attention (falling back to XLA attention if cuDNN cannot compile the step). Not run when this
tool was written (no GPU); it reuses the CPU path's code with those settings.

Model FLOPs per token (the PaLM / Chinchilla accounting):
    6·P + 12·n_layers·d_model·L
with P the non-embedding parameters *including* the output head (n_layers·(4·D² + 3·D·F) + D·V;
the input embedding is a gather, not a matmul), and 12·n_layers·D·L the attention score and
value matmuls (QKᵀ and AV, forward + backward, counted without causal masking's savings).
MFU = achieved model FLOP/s ÷ the GEMM rate measured in this process by a jitted JAX matmul of a
representative shape, [B·L, D] @ [D, 4·D] in the compute dtype, timed in every repetition. A large
square GEMM is timed too and printed for reference; it is not the MFU denominator. On GPU the MFU
against the device's nominal dense peak is printed as well when the device is known.

Prints `uptime` first, a table, then (last) one JSON line with `speedup_vs_hf_torch` (rareret
tokens/s ÷ PyTorch tokens/s; null in GPU mode) and `mfu` (rareret's MFU; in GPU mode a dict by
rung).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from rareret import host_malloc
from rareret.lm.spec import LmTrain
from rareret.mesh_spec import MeshSpec

NOMINAL_BF16_DENSE = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # FLOP/s, SXM parts.


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def pin_cpus(count: int) -> list[int]:
    """Restricts this process (and the thread pools created later) to `count` allowed CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[:count]
    os.sched_setaffinity(0, chosen)
    return chosen


def model_flops_per_token(config, seq_len: int) -> float:
    """6·P + 12·n_layers·d_model·L, P = non-embedding params including the head (docstring)."""
    from rareret.lm.config import param_count

    params = param_count(config)["non_embedding"] + config.d_model * config.vocab_size
    return 6.0 * params + 12.0 * config.n_layers * config.d_model * seq_len


def _seconds_per_call(run, min_seconds: float) -> float:
    """Seconds per call, from `run(n)`, which makes n calls and blocks on the last: n is grown
    until one timing lasts ≥ min_seconds (JAX dispatch is asynchronous, so per-call overheads
    overlap the work, as they do in a training loop)."""
    calls = 1
    while True:
        start = time.perf_counter()
        run(calls)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls
        calls = max(calls + 1, int(calls * 1.2 * min_seconds / max(elapsed, 1e-6)))


class JaxGemm:
    """A jitted [m, k] @ [k, n] in `dtype` on the default device; `rate()` is its FLOP/s."""

    def __init__(self, m: int, k: int, n: int, dtype: str):
        import jax
        import jax.numpy as jnp

        dt = jnp.dtype(dtype)
        self.name = f"JAX GEMM [{m},{k}]@[{k},{n}] {dt.name}"
        self.flops = 2.0 * m * k * n
        self.a = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(dt)
        self.b = jax.random.normal(jax.random.key(2), (k, n), jnp.float32).astype(dt)
        self.matmul = jax.jit(lambda x, y: x @ y)
        self.matmul(self.a, self.b).block_until_ready()  # Compiles.

    def rate(self, min_seconds: float = 0.15) -> float:
        def run(calls):
            for _ in range(calls):
                out = self.matmul(self.a, self.b)
            out.block_until_ready()

        return self.flops / _seconds_per_call(run, min_seconds)


class TorchGemm:
    """A float32 torch [m, k] @ [k, n] on the CPU; `rate()` is its FLOP/s."""

    def __init__(self, m: int, k: int, n: int):
        import torch

        self.name = f"torch GEMM [{m},{k}]@[{k},{n}] float32"
        self.flops = 2.0 * m * k * n
        self.a, self.b = torch.randn(m, k), torch.randn(k, n)

    def rate(self, min_seconds: float = 0.15) -> float:
        def run(calls):
            for _ in range(calls):
                self.a @ self.b

        return self.flops / _seconds_per_call(run, min_seconds)


# ----------------------------------------------------------------------------- the two sides

class RareretSide:
    """rareret's jitted, sharded train step on a fixed batch."""

    name = "rareret (JAX)"

    def __init__(self, model: str, seq_len: int, batch: int, compute_dtype: str = "float32",
                 attention: str = "xla", seed: int = 0):
        import dataclasses

        import numpy as np

        from rareret import sharding
        from rareret.lm import ladder, train

        vocab = ladder.LADDER[model].vocab_size
        self.spec = LmTrain(model=model, compute_dtype=compute_dtype, vocab_size=vocab,
                                  seq_len=seq_len, global_batch=batch, num_steps=100_000,
                                  seed=seed)
        mesh = sharding.make_mesh(MeshSpec())
        self.program = train.LmModel(self.spec, vocab, mesh)
        if attention != self.program.config.attention:
            # The jitted functions read `program.config` when first traced, i.e. after this.
            self.program.config = dataclasses.replace(self.program.config, attention=attention)
        self.config = self.program.config
        rng = np.random.default_rng(seed)
        self.batch = rng.integers(0, vocab, size=(batch, seq_len), dtype=np.int32)
        self.state = self.program.init()
        self.tokens_per_step = batch * seq_len
        self.first_loss = None

    def run(self, steps: int) -> float:
        """Seconds for `steps` train steps (the state is ready before and after)."""
        import jax

        jax.block_until_ready(self.state)
        start = time.perf_counter()
        for _ in range(steps):
            self.state, loss = self.program.step(self.state, self.batch)
        jax.block_until_ready((self.state, loss))
        seconds = time.perf_counter() - start
        if self.first_loss is None:  # The first call is one step (`measure`).
            self.first_loss = float(loss)
        return seconds


class TorchSide:
    """A plain PyTorch loop over HF `OlmoForCausalLM` with rareret's initial weights."""

    name = "HF OlmoForCausalLM (PyTorch)"

    def __init__(self, reference: RareretSide):
        import jax
        import torch

        from rareret.lm import hf_interop

        assert reference.first_loss is None, "build the torch side before rareret trains"
        spec = reference.spec
        params = jax.device_get(reference.state["params"])  # rareret's initial weights.
        self.model = hf_interop.to_hf_model(reference.config, params).train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), eps=1e-8,
            weight_decay=spec.weight_decay)
        self.clip_norm = spec.clip_norm
        self.ids = torch.from_numpy(reference.batch).long()
        self.tokens_per_step = reference.tokens_per_step
        self.attention = self.model.config._attn_implementation
        self.first_loss = None

    def run(self, steps: int) -> float:
        import torch

        start = time.perf_counter()
        for _ in range(steps):
            loss = self.model(input_ids=self.ids, labels=self.ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        seconds = time.perf_counter() - start
        if self.first_loss is None:  # The first call is one step (`measure`).
            self.first_loss = value
        return seconds


def measure(sides, steps: int, reps: int, warmup: int, gemms=()) -> dict[str, list[float]]:
    """Per name, one value per repetition: tokens/s of each side's timed block of `steps` steps,
    then FLOP/s of each GEMM probe, all taken in turn within every repetition so that they see
    the same machine conditions."""
    for side in sides:
        side.run(1)  # Compiles (JAX); records the first-step loss.
        if warmup > 1:
            side.run(warmup - 1)
    for gemm in gemms:
        gemm.rate(0.05)  # Warms the probe up.
    values = {item.name: [] for item in (*sides, *gemms)}
    for _ in range(reps):
        for side in sides:
            values[side.name].append(steps * side.tokens_per_step / side.run(steps))
        for gemm in gemms:
            values[gemm.name].append(gemm.rate())
    return values


# ----------------------------------------------------------------------------- modes

def _blocks(values) -> str:
    return " ".join(f"{v:,.0f}" for v in values)


def cpu_mode(args) -> dict:
    import torch

    torch.set_num_threads(args.torch_threads)
    jax_side = RareretSide(args.model, args.seq_len, args.batch)
    torch_side = TorchSide(jax_side)
    config = jax_side.config
    d, tokens = config.d_model, args.batch * args.seq_len
    gemm = JaxGemm(tokens, d, 4 * d, config.compute_dtype)  # The MFU denominator.
    square = JaxGemm(1024, 1024, 1024, config.compute_dtype)
    gemm_torch = TorchGemm(tokens, d, 4 * d)
    values = measure([jax_side, torch_side], args.steps, args.reps, args.warmup,
                     [gemm, square, gemm_torch])
    median = {name: statistics.median(v) for name, v in values.items()}
    jax_rate, torch_rate, gemm_rate = (median[x.name] for x in (jax_side, torch_side, gemm))
    speedup = jax_rate / torch_rate
    flops_per_token = model_flops_per_token(config, args.seq_len)
    attention_flops = 12 * config.n_layers * d * args.seq_len

    print(f"\nmodel {args.model}: d_model {d}, {config.n_layers} layers, {config.n_heads} heads, "
          f"MLP hidden {config.mlp_hidden}, vocab {config.vocab_size}; L={args.seq_len}, "
          f"B={args.batch} ({tokens} tokens/step), {config.compute_dtype}")
    policy = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    print(f"CPUs {sorted(os.sched_getaffinity(0))} (XLA and torch); torch threads "
          f"{torch.get_num_threads()}, OMP_WAIT_POLICY {policy}, HF attention "
          f"{torch_side.attention!r}")
    print(f"model FLOPs/token {flops_per_token:,.0f} = 6·P (P = "
          f"{(flops_per_token - attention_flops) / 6:,.0f} incl. head) + 12·n_layers·d·L "
          f"({attention_flops:,})")
    print(f"first-step loss: rareret {jax_side.first_loss:.6f}, torch {torch_side.first_loss:.6f}")
    width = max(len(x.name) for x in (gemm, square, gemm_torch, jax_side, torch_side))
    print(f"\n{'':<{width}} {'median':>10} {'unit':>9}  per repetition")
    for item in (gemm, square, gemm_torch):
        print(f"{item.name:<{width}} {median[item.name] / 1e9:10.1f} {'GFLOP/s':>9}  "
              f"{' '.join(f'{v / 1e9:.0f}' for v in values[item.name])}")
    mfu = {}
    for side in (jax_side, torch_side):
        rate = median[side.name]
        mfu[side.name] = rate * flops_per_token / gemm_rate
        print(f"{side.name:<{width}} {rate:10,.0f} {'tokens/s':>9}  {_blocks(values[side.name])}")
    print(f"\n{'':<30} {'tokens/s':>10} {'ms/step':>8} {'MFU':>6}")
    for side in (jax_side, torch_side):
        rate = median[side.name]
        print(f"{side.name:<30} {rate:10,.0f} {1e3 * side.tokens_per_step / rate:8.1f} "
              f"{mfu[side.name]:6.1%}")
    print(f"speedup rareret ÷ torch: {speedup:.2f}× (goal ≥ 1.5); MFU = model FLOP/s ÷ "
          f"{gemm.name} ({gemm_rate / 1e9:.1f} GFLOP/s)")
    return {"speedup_vs_hf_torch": round(speedup, 3), "mfu": round(mfu[jax_side.name], 4),
            "mfu_hf_torch": round(mfu[torch_side.name], 4),
            "tokens_per_s": round(jax_rate, 1), "tokens_per_s_hf_torch": round(torch_rate, 1),
            "gemm_gflops": round(gemm_rate / 1e9, 2), "model": args.model,
            "seq_len": args.seq_len, "batch": args.batch, "cpus": args.cpus,
            "torch_threads": args.torch_threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "loss_step0": [round(jax_side.first_loss, 6), round(torch_side.first_loss, 6)]}


def gpu_mode(args) -> dict:
    import jax

    backend = jax.default_backend()
    if backend != "gpu":
        sys.exit(f"bench_lm: --device gpu needs a GPU backend; JAX has {backend!r}")
    kind = jax.devices()[0].device_kind
    nominal = next((v for k, v in NOMINAL_BF16_DENSE.items() if k in kind), None)
    print(f"device: {kind} × {jax.device_count()}")
    results, rows = {}, []
    for model in args.models:
        side = None
        for attention in ("cudnn", "xla"):
            try:
                side = RareretSide(model, args.seq_len, args.batch, "bfloat16", attention)
                side.run(1)  # Compiles now, so that a cuDNN failure falls back to XLA.
                break
            except Exception as e:  # noqa: BLE001 - any compile/runtime failure of cuDNN.
                if attention == "xla":
                    raise
                print(f"{model}: cudnn attention failed ({' '.join(str(e).split())[:200]}); "
                      f"using xla attention")
                side = None
        config = side.config
        d, tokens = config.d_model, args.batch * args.seq_len
        gemm = JaxGemm(tokens, d, 4 * d, "bfloat16")
        values = measure([side], args.steps, args.reps, args.warmup, [gemm])
        rate, gemm_rate = (statistics.median(values[x.name]) for x in (side, gemm))
        flops = rate * model_flops_per_token(config, args.seq_len)
        results[model] = {"tokens_per_s": round(rate, 1), "mfu": round(flops / gemm_rate, 4),
                          "gemm_tflops": round(gemm_rate / 1e12, 1), "attention": attention,
                          "mfu_vs_nominal": round(flops / nominal, 4) if nominal else None}
        rows.append((model, attention, rate, flops, gemm_rate, _blocks(values[side.name])))
        del side
    square = JaxGemm(8192, 8192, 8192, "bfloat16")
    peak = statistics.median(square.rate(0.5) for _ in range(3))
    print(f"\nL={args.seq_len}, B={args.batch}; bfloat16 compute, float32 params; {square.name} "
          f"{peak / 1e12:.0f} TFLOP/s; nominal dense peak "
          f"{f'{nominal / 1e12:.0f} TFLOP/s' if nominal else 'unknown'}")
    print(f"\n{'rung':<9} {'attention':>9} {'tokens/s':>12} {'model TFLOP/s':>14} "
          f"{'GEMM TFLOP/s':>13} {'MFU':>6} {'MFU nominal':>12}  tokens/s per repetition")
    for model, attention, rate, flops, gemm_rate, blocks in rows:
        vs_nominal = f"{flops / nominal:.1%}" if nominal else "-"
        print(f"{model:<9} {attention:>9} {rate:12,.0f} {flops / 1e12:14.1f} "
              f"{gemm_rate / 1e12:13.1f} {flops / gemm_rate:6.1%} {vs_nominal:>12}  {blocks}")
    print("MFU = model FLOP/s ÷ the JAX GEMM [B·L, d]@[d, 4d] bf16 rate of the same rung "
          "(goal: ≥ 45% at 300M on an H100)")
    return {"speedup_vs_hf_torch": None, "mfu": {m: r["mfu"] for m, r in results.items()},
            "runs": results, "seq_len": args.seq_len, "batch": args.batch, "device": kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--model", default="cpu-small", help="ladder rung (CPU mode)")
    parser.add_argument("--models", nargs="+", default=["20M", "300M"], help="rungs (GPU mode)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 128 CPU, 1024 GPU")
    parser.add_argument("--batch", type=int, default=None, help="default 16 CPU, 32 GPU")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block")
    parser.add_argument("--reps", type=int, default=7, help="timed blocks per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    parser.add_argument("--cpus", type=int, default=2,
                        help="CPU mode: CPUs the process (XLA and torch) is pinned to")
    parser.add_argument("--torch-threads", type=int, default=None, help="default: --cpus")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active", "inherit"),
                        default="passive",
                        help="OMP_WAIT_POLICY for torch's OpenMP pool; 'inherit' leaves the "
                             "environment's (see the docstring)")
    args = parser.parse_args()
    gpu = args.device == "gpu"
    args.seq_len = args.seq_len or (1024 if gpu else 128)
    args.batch = args.batch or (32 if gpu else 16)
    args.steps = args.steps or (10 if gpu else 5)
    print(uptime(), flush=True)
    # As the CLI's LM runs do, before JAX and torch start threads; both sides run under it.
    print(f"glibc malloc set to reuse freed memory: {host_malloc.reuse_freed_memory()}")
    if not gpu:  # Before jax and torch are imported.
        os.environ["JAX_PLATFORMS"] = "cpu"
        if args.omp_wait_policy != "inherit":
            os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
        args.cpus = len(pin_cpus(args.cpus))
        args.torch_threads = args.torch_threads or args.cpus
    summary = gpu_mode(args) if gpu else cpu_mode(args)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Train tokens/s of the rareret LM step vs a PyTorch loop of HF `OlmoForCausalLM`, plus MFU.

    python tools/bench_lm.py [--model cpu-small] [--seq-len 128] [--batch 16] [--reps 7]
    python tools/bench_lm.py --device gpu [--models 20M 300M] [--seq-len 1024] [--batch 32]
    python tools/bench_lm.py --memory --model 300M [--devices 4] [--mesh fsdp|tensor]
        [--batch 4] [--seq-len 256] [--records 4] [--record-every 1] [--interference]

Memory mode (issue #16 item 7: peak ≤ 1.25 × budget + 1 GB, flat over records and saves): a
run of `--model` with olmo_300m.gin's settings on a `.npy` of random tokens, through `Run` as
the CLI runs it, with a record and a checkpoint every `--record-every` steps (with
`--interference`, records with the gradient-interference measurements too); on CPU over
`--devices` forced host devices. Per phase (the 1-device step compiled for the budget, init,
each record, the step's compile, each chunk of steps, each checkpoint): peak host RSS (VmHWM,
reset through /proc/self/clear_refs at the phase's start), RSS after it, and the devices' peak
memory where they report it (not on CPU). Budget = params + grads (as params) + optimiser state
(bytes of the state's pytrees) + one step's activations, taken as the 1-device train step's
compiled temporaries (`memory_analysis().temp_size_in_bytes`) less the gradients among them;
so one budget serves every mesh. Also prints the peaks of the record-to-record cycles after the
first checkpoint (their spread: the drift).

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
freed memory (`rareret.host_malloc`; torch allocates through the same malloc, so both sides run
under it) and XLA's CPU scheduler to save memory (`train.schedule_for_memory`).

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
rung); in memory mode, the budget, bound, peak and every phase.
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


# ----------------------------------------------------------------------------- memory mode

GB = 1e9


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PhaseMemory:
    """Per phase of this process: peak host RSS (VmHWM, reset to VmRSS through
    /proc/self/clear_refs when the phase starts), RSS after it, and the devices' peak memory
    (`memory_stats()["peak_bytes_in_use"]`; None where a device has no stats, as on CPU)."""

    def __init__(self):
        self.rows: list[dict] = []

    def measure(self, name: str, fn):
        """`fn()`, waited for, measured as phase `name`."""
        import jax

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        stats = [d.memory_stats() for d in jax.local_devices()]
        device = sum(s["peak_bytes_in_use"] for s in stats) if all(stats) else None
        self.rows.append({"phase": name, "peak_gb": _status_kb("VmHWM") * 1024 / GB,
                          "rss_after_gb": _status_kb("VmRSS") * 1024 / GB,
                          "device_peak_gb": None if device is None else device / GB,
                          "seconds": time.perf_counter() - start})
        return out


def _tree_bytes(tree) -> int:
    import jax

    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def memory_spec(args, directory: str) -> LmTrain:
    """olmo_300m.gin's settings (bfloat16 compute, remat, a T_CMP task at 2.4e-6 per token,
    FSDP over every device, or with `--mesh tensor` tensor parallelism) at rung `--model`,
    B × L from the flags, 16 eval instances, a record and a checkpoint every `--record-every`
    steps (with `--interference`, each with the gradient-interference measurements), on a
    `.npy` of random tokens written into `directory`."""
    import numpy as np

    from rareret.lm import inject
    from rareret.lm.ladder import PAPER_VOCAB

    steps = args.records * args.record_every
    vocab = PAPER_VOCAB - 24  # OLMo's 50,280, padded to 50,304 by the model.
    tokens = np.random.default_rng(0).integers(
        1, vocab, size=(steps * args.batch + 64) * args.seq_len, dtype=np.uint16)
    path = os.path.join(directory, "tokens.npy")
    np.save(path, tokens)
    return LmTrain(model=args.model, compute_dtype="bfloat16", remat=not args.no_remat,
                   data=path, vocab_size=vocab, eos_id=0, seq_len=args.seq_len,
                   global_batch=args.batch, num_steps=steps, warmup_steps=1,
                   record_every=args.record_every, checkpoint_every=args.record_every,
                   eval_instances=16,
                   interference_every=args.record_every if args.interference else 0,
                   tasks=(inject.TaskSpec(kind="cmp", name="cmp", frequency_per_token=2.4e-6),),
                   mesh=MeshSpec(data=1, fsdp=-1) if args.mesh == "fsdp"
                   else MeshSpec(data=1, fsdp=1, tensor=-1))


def step_memory(model, batch_dtype) -> dict:
    """The `memory_analysis()` (bytes) of `model`'s (an `LmModel`) compiled train step; the
    compiled step is cached, so training reuses it."""
    import jax

    spec = model.spec
    batch = jax.ShapeDtypeStruct((spec.global_batch, spec.seq_len), batch_dtype,
                                 sharding=model.batch_sharding)
    stats = model.traced(lambda: model.train_step.lower(model.abstract_state(), batch)
                         .compile()).memory_analysis()
    return {name: getattr(stats, f"{name}_size_in_bytes")
            for name in ("argument", "output", "alias", "temp")}


def memory_mode(args) -> dict:
    """Runs `memory_spec` through `Run`, as the CLI does, with every phase measured."""
    import tempfile

    import jax

    from rareret import sharding
    from rareret.lm import train
    from rareret.run import Run

    memory = PhaseMemory()
    with tempfile.TemporaryDirectory() as directory:
        spec = memory_spec(args, directory)
        program = train.LmProgram(spec)
        batch_dtype = program.injector.inject(program.dataset[0], 0)[0].dtype
        # The budget's activations come from one device's step: one budget for every mesh.
        one_device = train.LmModel(spec, program.model.config.vocab_size,
                                   sharding.make_mesh(MeshSpec(), jax.devices()[:1]))
        budget_step = memory.measure("compile (1 device, for the budget)",
                                     lambda: step_memory(one_device, batch_dtype))
        run = Run(program, os.path.join(directory, "run"), show_progress=False)
        for name, phase in (("init", "init"), ("train", "step"), ("record", "record")):
            setattr(program, name, lambda *a, method=getattr(program, name), phase=phase:
                    memory.measure(phase, lambda: method(*a)))
        run.start()
        # The tool's own compile (a run compiles inside its first step); like every compile,
        # its freed memory goes back (`host_malloc.release_after_compilations`).
        step = memory.measure("compile", lambda: step_memory(program.model, batch_dtype))
        save = run.checkpoints.save
        run.checkpoints.save = lambda *a: memory.measure("checkpoint", lambda: save(*a))
        while not run.done:
            run.advance()
        run.finish()
        run.close()
        state = run.state["model"]
    params, opt = _tree_bytes(state["params"]), _tree_bytes(state["opt_state"])
    # One step's activations: the step's temporaries less the gradients they hold.
    activations = max(budget_step["temp"] - params, 0)
    budget = 2 * params + opt + activations
    bound = 1.25 * budget + GB
    rows = memory.rows
    peak = max(r["peak_gb"] for r in rows) * GB
    # Stability: the peaks of the cycles (steps, record, checkpoint) after the first one.
    saves = [i for i, r in enumerate(rows) if r["phase"] == "checkpoint"]
    cycles = [max(r["peak_gb"] for r in rows[a + 1:b + 1]) for a, b in zip(saves, saves[1:])]
    drift = max(cycles) - min(cycles) if cycles else 0.0
    print(f"\nmodel {args.model} ({program.model.config.d_model} wide, "
          f"{program.model.config.n_layers} layers, remat {spec.remat}), B={spec.global_batch}, "
          f"L={spec.seq_len}, {jax.device_count()} {jax.default_backend()} device(s) "
          f"({args.mesh} mesh {dict(program.mesh.shape)}), a "
          f"record{' with interference' if spec.interference_every else ''} and a checkpoint "
          f"every {spec.record_every} steps")
    print(f"budget {budget / GB:.3f} GB = params {params / GB:.3f} + grads {params / GB:.3f} + "
          f"optimiser {opt / GB:.3f} + activations {activations / GB:.3f} (1-device step temp "
          f"{budget_step['temp'] / GB:.3f} − grads); bound 1.25 × budget + 1 GB = "
          f"{bound / GB:.3f} GB")
    print(f"this mesh's step: arguments {step['argument'] / GB:.3f} GB, temp "
          f"{step['temp'] / GB:.3f} GB per device")
    print(f"\n{'phase':<36} {'peak RSS GB':>11} {'RSS after':>9} {'device GB':>9} {'s':>7}")
    for r in rows:
        device = "-" if r["device_peak_gb"] is None else f"{r['device_peak_gb']:.3f}"
        print(f"{r['phase']:<36} {r['peak_gb']:11.3f} {r['rss_after_gb']:9.3f} {device:>9} "
              f"{r['seconds']:7.1f}")
    print(f"peak {peak / GB:.3f} GB = {peak / budget:.2f} × budget; bound {bound / GB:.3f} GB: "
          f"{'within' if peak <= bound else 'OVER'}; peaks of the cycles after the first "
          f"checkpoint: {' '.join(f'{c:.3f}' for c in cycles)} GB (drift {drift:.3f})")
    return {"model": args.model, "devices": jax.device_count(), "mesh": args.mesh,
            "batch": spec.global_batch,
            "seq_len": spec.seq_len, "remat": spec.remat, "params_gb": params / GB,
            "opt_state_gb": opt / GB, "activations_gb": activations / GB,
            "budget_gb": budget / GB, "bound_gb": bound / GB, "peak_gb": peak / GB,
            "within_bound": peak <= bound, "cycle_peaks_gb": cycles, "drift_gb": drift,
            "phases": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                       for r in rows]}


def main() -> None:
    from rareret.lm.train import schedule_for_memory

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
    parser.add_argument("--memory", action="store_true",
                        help="memory mode: peak memory per phase of a run of --model")
    parser.add_argument("--devices", type=int, default=1,
                        help="memory mode on CPU: forced host devices (XLA_FLAGS)")
    parser.add_argument("--records", type=int, default=4,
                        help="memory mode: records (and checkpoints) after step 0")
    parser.add_argument("--record-every", type=int, default=1,
                        help="memory mode: steps between records and checkpoints")
    parser.add_argument("--no-remat", action="store_true", help="memory mode: remat off")
    parser.add_argument("--interference", action="store_true",
                        help="memory mode: a gradient-interference record at every record")
    parser.add_argument("--mesh", choices=("fsdp", "tensor"), default="fsdp",
                        help="memory mode: shard over every device by FSDP or tensor axes")
    args = parser.parse_args()
    gpu = args.device == "gpu"
    args.seq_len = args.seq_len or (256 if args.memory else 1024 if gpu else 128)
    args.batch = args.batch or (4 if args.memory else 32 if gpu else 16)
    args.steps = args.steps or (10 if gpu else 5)
    print(uptime(), flush=True)
    # As the CLI's LM runs do, before JAX and torch start threads; both sides run under it.
    print(f"glibc malloc set to reuse freed memory: {host_malloc.reuse_freed_memory()}")
    schedule_for_memory()  # Also as the CLI's LM runs do.
    if not gpu:  # Before JAX's backend starts and torch is imported.
        import jax

        jax.config.update("jax_platforms", "cpu")  # jax read JAX_PLATFORMS on import.
        if args.memory and args.devices > 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                                       f"platform_device_count={args.devices}")
        if args.omp_wait_policy != "inherit":
            os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
        args.cpus = len(pin_cpus(args.cpus))
        args.torch_threads = args.torch_threads or args.cpus
    host_malloc.release_after_compilations()
    summary = (memory_mode(args) if args.memory else gpu_mode(args) if gpu
               else cpu_mode(args))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

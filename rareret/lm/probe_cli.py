"""`rareret-probe`: causal probes of a trained LM run's checkpoints.

    rareret-probe das WORKDIR [--step N] [--task NAME] [--variable X|Y] [--layers 0,1,2]
                              [--position 1] [--k 1] [--steps 1000] [--pairs 4000] [--seed 0]

`das` runs distributed alignment search (rareret/lm/das.py) for one T_CMP task of the run in
WORKDIR at checkpoint N (default: the latest): for each residual-stream layer (0 =
embeddings, ℓ = after ℓ blocks; default: all) it learns a k-dim subspace at sequence `position`
(of the input TOK1 TOK2) on counterfactual pairs from the task's train split (`das.fit`) and
measures its interchange-intervention accuracy on pairs from the held-out test split
(`das.iia`). The logits are read at position 1 (LABEL's) over the task's two label tokens. It
prints a table (layer, train IIA, held-out IIA) and writes WORKDIR/report/das_step{N}.json
(replacing an earlier result for that step).

Every bad input (a WORKDIR without a run, a run of another experiment, a step without a
checkpoint, a task that is not one of the run's cmp tasks, a layer out of range, ...) ends the
command with one line `rareret-probe: error: ...` on stderr and exit status 2, before any model
is built. The run's data and tokenizer must still be where the run read them (`LmTrain.data`,
`LmTrain.tokenizer`), as for resuming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from rareret.errors import ConfigError, is_int, one_line, require
from rareret.lm import inject, ladder
from rareret.lm.spec import LmTrain
from rareret.mesh_spec import MeshSpec

PROG = "rareret-probe"
INPUT_LEN = 2  # TOK1 TOK2: the DAS inputs.


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of the other rareret commands."""

    def error(self, message):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Causal probes of a trained rareret LM run.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    das_parser = commands.add_parser(
        "das", help="distributed alignment search for a T_CMP task",
        description="Distributed alignment search (rareret/lm/das.py) for one T_CMP task of the "
                    "LM run in WORKDIR: per layer, fit a subspace on train-split pairs and score "
                    "its interchange-intervention accuracy (IIA) on held-out pairs.")
    das_parser.add_argument("workdir", metavar="WORKDIR", help="the run's directory")
    das_parser.add_argument("--step", type=int, default=None,
                            help="checkpoint step (default: the latest)")
    das_parser.add_argument("--task", default=None,
                            help="a cmp task of the run (default: its first cmp task)")
    das_parser.add_argument("--variable", default="X", help="causal variable: X (TOK1's value) or "
                                                            "Y (TOK2's value); default X")
    das_parser.add_argument("--layers", default=None,
                            help="comma-separated residual-stream layers, 0 = embeddings, "
                                 "ℓ = after ℓ blocks (default: all)")
    das_parser.add_argument("--position", type=int, default=1,
                            help="sequence position of the site: 0 = TOK1, 1 = TOK2 (default 1)")
    das_parser.add_argument("--k", type=int, default=1, help="subspace dimension (default 1)")
    das_parser.add_argument("--steps", type=int, default=None,
                            help="DAS training steps per layer (default: das.DEFAULT_STEPS)")
    das_parser.add_argument("--pairs", type=int, default=4000,
                            help="counterfactual pairs per split (default 4000)")
    das_parser.add_argument("--seed", type=int, default=0, help="pairs and initial subspace")
    return parser


# ----------------------------------------------------------------------------- checks (no JAX)

@dataclasses.dataclass(frozen=True)
class DasRequest:
    """A checked `das` command: what to probe, before anything is built."""

    workdir: str
    spec: LmTrain
    step: int
    task: str
    layers: tuple[int, ...]
    variable: str
    position: int
    k: int
    steps: int | None
    pairs: int
    seed: int


def load_spec(workdir: str) -> LmTrain:
    """The `LmTrain` of the LM run in `workdir`; ConfigError if it holds none."""
    from rareret.analysis.phase import read_spec  # numpy only: no JAX.

    spec = read_spec(workdir)
    experiment = spec.get("experiment")
    require(experiment == "lm", f"{workdir} holds a run of experiment {experiment!r}; "
                                f"{PROG} probes LM runs only")
    fields = dict(spec.get("lm") or {})
    try:
        fields["tasks"] = tuple(inject.TaskSpec(**t) for t in fields.get("tasks") or ())
        if isinstance(fields.get("mesh"), dict):
            fields["mesh"] = MeshSpec(**fields["mesh"])
        return LmTrain(**fields)
    except TypeError as e:  # Fields this version does not know (or lacks).
        raise ConfigError(f"{workdir}/spec.json is not an LmTrain this version reads: "
                          f"{one_line(e)}") from e


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the committed checkpoints (orbax's temporary directories are not numbers)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def parse_layers(text: str | None, n_layers: int) -> tuple[int, ...]:
    if text is None:
        return tuple(range(n_layers + 1))
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--layers={text!r} must be comma-separated integers in "
                          f"[0, {n_layers}]") from None
    bad = [layer for layer in layers if not 0 <= layer <= n_layers]
    require(not bad, f"--layers: {bad} out of range; the model has {n_layers} blocks, so layers "
                     f"are 0 (embeddings) to {n_layers}")
    require(len(set(layers)) == len(layers), f"--layers={text!r} repeats a layer")
    return layers


def check_das(args: argparse.Namespace) -> DasRequest:
    """Every check of a `das` command that needs no model; ConfigError on the first failure."""
    from rareret.lm import das  # Validation constants only; das imports JAX.

    workdir = args.workdir
    spec = load_spec(workdir)
    cmp_tasks = [t.name for t in spec.tasks if t.kind == "cmp"]
    require(cmp_tasks, f"{workdir}: the run has no cmp task (tasks: "
                       f"{[f'{t.name} ({t.kind})' for t in spec.tasks]}); DAS probes T_CMP")
    task = cmp_tasks[0] if args.task is None else args.task
    require(task in cmp_tasks, f"--task={task!r} is not a cmp task of the run; its cmp tasks: "
                               f"{cmp_tasks}")
    config = ladder.config_for(spec.model, variant=spec.variant)
    layers = parse_layers(args.layers, config.n_layers)
    require(args.variable in das.VARIABLES,
            f"--variable={args.variable!r} must be one of {list(das.VARIABLES)}")
    require(0 <= args.position < INPUT_LEN,
            f"--position={args.position} must be 0 (TOK1) or 1 (TOK2)")
    require(1 <= args.k <= config.d_model,
            f"--k={args.k} must be in [1, d_model={config.d_model}]")
    require(args.steps is None or args.steps >= 1, f"--steps={args.steps} must be ≥ 1")
    require(args.pairs >= 2, f"--pairs={args.pairs} must be ≥ 2")
    require(args.seed >= 0, f"--seed={args.seed} must be ≥ 0")
    available = checkpoint_steps(workdir)
    require(available, f"{workdir} holds no checkpoint yet")
    step = available[-1] if args.step is None else args.step
    require(is_int(step) and step in available,
            f"--step={step}: no checkpoint at that step; checkpoints: {available}")
    return DasRequest(workdir, spec, step, task, layers, args.variable, args.position, args.k,
                      args.steps, args.pairs, args.seed)


# ----------------------------------------------------------------------------- DAS (JAX)

def restore_params(workdir: str, spec: LmTrain, step: int):
    """(program, params) of the run's checkpoint `step`; `program.setup` rebuilds the corpus,
    tokenizer, model and tasks as the run had them (rareret-export reads checkpoints this way
    too)."""
    from rareret.checkpoint import Checkpoints
    from rareret.lm.train import LmProgram

    program = LmProgram(spec)
    program.setup(workdir)
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
    try:
        state = checkpoints.restore(step, program.abstract_state())
    finally:
        checkpoints.close()
    return program, state["model"]["params"]


def run_das(request: DasRequest, out=sys.stdout) -> dict:
    """Fits and scores DAS at every requested layer; returns the JSON-able result."""
    from rareret.lm import das

    program, params = restore_params(request.workdir, request.spec, request.step)
    config = program.model.config
    task = next(t for t in program.injector.tasks if t.spec.name == request.task)
    candidates = inject.label_candidates(task)
    train = das.counterfactual_pairs(task, "train", request.pairs, request.variable, request.seed)
    test = das.counterfactual_pairs(task, "test", request.pairs, request.variable, request.seed)
    steps = das.DEFAULT_STEPS if request.steps is None else request.steps
    print(f"DAS on {request.workdir}, step {request.step}: task {request.task!r}, variable "
          f"{request.variable}, position {request.position}, k={request.k}, {steps} steps, "
          f"{request.pairs} pairs per split", file=out)
    print(f"{'layer':>5}  {'train IIA':>9}  {'held-out IIA':>12}  {'final loss':>10}  "
          f"{'seconds':>7}", file=out, flush=True)
    rows = []
    for layer in request.layers:
        start = time.perf_counter()
        hidden_fn, rest_fn = das.lm_site_fns(config, layer, request.position,
                                             candidates=candidates)
        result = das.fit(hidden_fn, rest_fn, train.base, train.source, train.label_index,
                         k=request.k, steps=steps, seed=request.seed, state=params)
        held_out = das.iia(hidden_fn, rest_fn, result.basis, test.base, test.source,
                           test.label_index, state=params)
        seconds = time.perf_counter() - start
        row = {"layer": layer, "train_iia": result.train_iia, "test_iia": held_out,
               "final_loss": float(result.losses[-1]), "seconds": round(seconds, 2)}
        rows.append(row)
        print(f"{layer:>5}  {row['train_iia']:>9.3f}  {held_out:>12.3f}  "
              f"{row['final_loss']:>10.4f}  {seconds:>7.1f}", file=out, flush=True)
    return {"workdir": os.path.abspath(request.workdir), "step": request.step,
            "task": request.task, "variable": request.variable, "position": request.position,
            "read_position": inject.LABEL_POS - 1, "k": request.k, "steps": steps,
            "pairs": request.pairs, "seed": request.seed, "layers": rows}


def write_result(workdir: str, result: dict) -> str:
    directory = os.path.join(workdir, "report")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"das_step{result['step']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return path


# ----------------------------------------------------------------------------- entry points

def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        request = check_das(args)  # The only command so far.
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO.
        result = run_das(request)
        print(f"wrote {write_result(request.workdir, result)}")
    except ConfigError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def run_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run_main()

"""The `rareret` command: absl flags + gin configs, t5x style.

    rareret --gin_file=gin_configs/synthetic/default.gin --workdir=runs/default \\
        [--gin_file=more.gin] [--gin_bindings='Sweep.num_steps = 500'] [--gin.Sweep.seeds=[0,1]]

gin binds the spec dataclasses here, at the edge; library code takes plain arguments. Every bad
value, binding or path ends the run with one line on stderr and exit status 2, before anything in
the workdir is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys

import gin
from absl import app, flags, logging

from rareret import host_malloc, sharding
from rareret.errors import ConfigError, one_line, require
from rareret.lm import inject
from rareret.lm import train as lm_train
from rareret.synthetic import runner, tasks
from rareret.synthetic import sweep as sweep_lib
from rareret.synthetic.spec import Injection, Sweep, TaskMixture
from rareret.lm.spec import LmTrain
from rareret.mesh_spec import MeshSpec

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "gin config file(s); later files override earlier.")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings such as 'Sweep.num_steps = 500'.")
flags.DEFINE_multi_string("gin_search_paths", ["."], "directories searched for gin files.")
flags.DEFINE_string("workdir", None, "run directory (config, metrics, report).")
flags.DEFINE_bool("overwrite", False, "replace a run already in --workdir.")
flags.DEFINE_bool("report", True, "write the report when the run ends.")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize (auto-detects TPU pods, "
                  "SLURM, ...; or give the three flags below).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for --distributed.")
flags.DEFINE_integer("num_processes", None, "number of processes, for --distributed.")
flags.DEFINE_integer("process_id", None, "this process's index, for --distributed.")

TaskMixture = gin.external_configurable(TaskMixture, name="TaskMixture")
Sweep = gin.external_configurable(Sweep, name="Sweep")
Injection = gin.external_configurable(Injection, name="Injection")
LmTrain = gin.external_configurable(LmTrain, name="LmTrain")
gin.external_configurable(inject.TaskSpec, name="TaskSpec")
gin.external_configurable(MeshSpec, name="MeshSpec")
EXPERIMENTS = ("synthetic", "lm")
RUN_MARKER = "spec.json"  # Present in every workdir that holds a run.


@gin.configurable("run", denylist=["workdir"])
def run(workdir: str, experiment: str = "synthetic",
        vary_mixture: dict[str, list] | None = None,
        injection: Injection | None = None) -> None:
    """Builds the experiment's specs from gin (validating them), then runs it in `workdir`.

    `injection` (`run.injection = @Injection()`) trains under a matched-frequency schedule.
    `vary_mixture` ({field: [values]}, one field) runs one sweep per value, in
    `workdir/<field>=<value>/`, for knobs that change the data stream (e.g. β).
    A workdir holding the same run resumes it; one holding another run is refused.
    """
    require(experiment in EXPERIMENTS,
            f"run.experiment={experiment!r} is not one of {list(EXPERIMENTS)}")
    if experiment == "lm":
        host_malloc.reuse_freed_memory()  # Before JAX's CPU backend starts (see the module).
        spec = LmTrain()
        inputs = lm_train.read_inputs(spec)
        claim_workdir(workdir, lm_train.spec_dict(spec))
        write_config(workdir)
        finish(lm_train.run_lm(spec, workdir, inputs=inputs))
        return
    base, sweep = TaskMixture(), Sweep()
    jobs = [(workdir, base)]
    if vary_mixture:
        require(len(vary_mixture) == 1 and all(isinstance(v, (list, tuple)) and v
                                               for v in vary_mixture.values()),
                f"run.vary_mixture={vary_mixture!r} must map one TaskMixture field to a "
                f"non-empty list of values")
        (field, values), = vary_mixture.items()
        known = [f.name for f in dataclasses.fields(TaskMixture)]
        require(field in known, f"run.vary_mixture: {field!r} is not one of {known}")
        jobs = [(os.path.join(workdir, f"{field}={value}"),
                 dataclasses.replace(base, **{field: value})) for value in values]
    for job_dir, mixture in jobs:
        sweep.check_against(mixture)
        if injection:
            injection.check_against(mixture, sweep.batch_size)
        check_workdir(job_dir, runner.spec_dict(mixture, sweep, injection))
    for job_dir, mixture in jobs:
        claim_workdir(job_dir, runner.spec_dict(mixture, sweep, injection))
        write_config(job_dir)
        finish(runner.run_sweep(mixture, sweep, job_dir, injection))
        if FLAGS.report:
            from rareret.analysis import report  # matplotlib loads only when a report is wanted.
            print(f"report: {report.write_report(job_dir)}")


def finish(completed: bool) -> None:
    """Exits 0 at once when a run stopped early for preemption (it resumes on a re-run)."""
    if not completed:
        sys.exit(0)


def write_config(workdir: str) -> None:
    with open(os.path.join(workdir, "config.gin"), "w") as f:
        f.write(gin.operative_config_str())


def check_workdir(workdir: str, spec: dict) -> bool:
    """Whether `workdir` resumes the run `spec` (True) or starts it; touches nothing.

    ConfigError if it is not a writable directory, or holds a different run (and no --overwrite).
    """
    require(not os.path.exists(workdir) or os.path.isdir(workdir),
            f"--workdir={workdir} exists and is not a directory")
    marker = os.path.join(workdir, RUN_MARKER)
    if os.path.exists(marker) and not FLAGS.overwrite:
        with open(marker) as f:
            require(json.load(f) == spec,
                    f"--workdir={workdir} already holds a run with a different config; choose "
                    f"another workdir or pass --overwrite to replace it")
        return True
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    require(os.access(existing, os.W_OK | os.X_OK),
            f"--workdir={workdir} is not writable ({existing} denies writing)")
    return False


def claim_workdir(workdir: str, spec: dict) -> None:
    """Prepares `workdir` for the run `spec`: kept as is to resume, else (re)created empty."""
    if not check_workdir(workdir, spec):
        prepare_workdir(workdir)


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir`, removing the outputs of a run it held (checked by `check_workdir`)."""
    for name in ("metrics", "report", "checkpoints", "data", "tokenizer.json", RUN_MARKER,
                 "config.gin"):
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} cannot be created: {e.strerror}") from e


def parse_gin(files: list[str], bindings: list[str], search_paths: list[str]) -> None:
    """Parses gin files, then bindings; gin's errors become one-line ConfigErrors naming them."""
    for path in search_paths:
        gin.add_config_file_search_path(path)
    for path in files:
        require(os.path.isfile(path) or any(os.path.isfile(os.path.join(root, path))
                                            for root in search_paths),
                f"--gin_file={path}: no such file")
        try:
            gin.parse_config_file(path)
        except Exception as e:  # gin raises many types (ValueError, SyntaxError, ...).
            raise ConfigError(f"--gin_file={path}: {one_line(e)}") from e
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except Exception as e:
            raise ConfigError(f"--gin_bindings={binding!r}: {one_line(e)}") from e
    gin.finalize()


def initialize_distributed(coordinator_address, num_processes, process_id) -> None:
    """One JAX program over many processes; CPU processes talk through gloo collectives."""
    import jax

    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def rewrite_gin_args(argv: list[str]) -> list[str]:
    """Turns t5x-style `--gin.X=Y` arguments into `--gin_bindings=X=Y`."""
    return [f"--gin_bindings={arg[len('--gin.'):]}" if arg.startswith("--gin.") else arg
            for arg in argv]


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO.
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        require(FLAGS.workdir, "--workdir is required")
        # Parse first: a bad file or binding then fails alone, before it can strand peers.
        parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
        if FLAGS.distributed:
            initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
        run(FLAGS.workdir)
    except ConfigError as e:
        # gin appends "In call to configurable ..." context lines; the first line is the message.
        print(f"rareret: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


def run_main() -> None:
    app.run(main, argv=rewrite_gin_args(sys.argv))


if __name__ == "__main__":
    run_main()

"""The `rareret` command: absl flags + gin configs, t5x style.

    rareret --gin_file=gin_configs/synthetic/default.gin --workdir=runs/default \\
        [--gin_file=more.gin] [--gin_bindings='Sweep.num_steps = 500'] [--gin.Sweep.seeds=[0,1]]

gin binds the spec dataclasses here, at the edge; library code takes plain arguments. Every bad
value, binding or path ends the run with one line on stderr and exit status 2, before anything in
the workdir is touched.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import gin
from absl import app, flags, logging

from rareret import cli_flags, host_malloc, processes
from rareret.errors import ConfigError, one_line, require
from rareret.grid_spec import Grid
from rareret.lm import inject
from rareret.lm.spec import LmTrain
from rareret.lm.train import LmProgram, schedule_for_memory
from rareret.mesh_spec import MeshSpec
from rareret.run import Run, TrainingDiverged
from rareret.synthetic.spec import Injection, Sweep, TaskMixture
from rareret.synthetic.sweep import SweepProgram

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(cli_flags)  # --dry_run, in --help.
flags.DEFINE_multi_string("gin_file", [], "gin config file(s); later files override earlier.")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings such as 'Sweep.num_steps = 500'.")
flags.DEFINE_multi_string("gin_search_paths", ["."], "directories searched for gin files.")
flags.DEFINE_string("workdir", None, "run directory (config, metrics, report).")
flags.DEFINE_bool("overwrite", False, "replace a run already in --workdir.")
flags.DEFINE_bool("report", True, "write the report when the run ends.")
flags.DEFINE_bool("progress", True, "show a progress line on stderr.")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize (auto-detects TPU pods, "
                  "SLURM, ...; or give the three flags below).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for --distributed.")
flags.DEFINE_integer("num_processes", None, "number of processes, for --distributed.")
flags.DEFINE_integer("process_id", None, "this process's index, for --distributed.")

# Grid: read by rareret-grid (rareret/grid.py); a run parses its bindings and ignores them.
for spec_class in (TaskMixture, Sweep, Injection, LmTrain, inject.TaskSpec, MeshSpec, Grid):
    gin.external_configurable(spec_class, name=spec_class.__name__)
EXPERIMENTS = ("synthetic", "lm")


@gin.configurable("run", denylist=["workdir"])
def run(workdir: str, experiment: str = "synthetic",
        vary_mixture: dict[str, list] | None = None,
        injection: Injection | None = None) -> None:
    """Builds the experiment's programs from gin (validating every input), then runs them.

    `injection` (`run.injection = @Injection()`) trains under a matched-frequency schedule.
    `vary_mixture` ({field: [values]}, one field) runs one sweep per value, in
    `workdir/<field>=<value>/`, for knobs that change the data stream (e.g. β).
    A workdir holding the same run resumes it; one holding another run is refused. Every check
    (of every sub-run) passes before any workdir is touched.
    """
    require(experiment in EXPERIMENTS,
            f"run.experiment={experiment!r} is not one of {list(EXPERIMENTS)}")
    if experiment == "lm":
        host_malloc.reuse_freed_memory()  # Before JAX's CPU backend starts (see the module).
        schedule_for_memory()  # Likewise.
        host_malloc.release_after_compilations()
        jobs = [(workdir, LmProgram(gin.get_configurable("LmTrain")()))]
    else:
        jobs = [(job_dir, SweepProgram(mixture, gin.get_configurable("Sweep")(), injection))
                for job_dir, mixture in mixture_jobs(workdir, vary_mixture)]
    config = gin.operative_config_str()
    runs = [Run(program, job_dir, overwrite=FLAGS.overwrite, config_text=config,
                show_progress=FLAGS.progress) for job_dir, program in jobs]
    if cli_flags.DRY_RUN.value:
        for job in runs:
            action = "resume" if job.resuming else "start"
            mesh = " × ".join(f"{axis} {size}" for axis, size in job.program.mesh.shape.items())
            print(f"dry run: would {action} {job.workdir}: {type(job.program).__name__}, "
                  f"{len(job.steps) - 1} records to step {job.steps[-1]}, on mesh {mesh}")
        return
    for job in runs:
        if not job.execute():
            sys.exit(0)  # Preempted: a re-run resumes.
        if FLAGS.report and processes.is_writer():
            from rareret.analysis import report  # matplotlib loads only when a report is wanted.
            print(f"report: {report.write_report(job.workdir)}")


def mixture_jobs(workdir: str, vary_mixture: dict[str, list] | None):
    """(workdir, TaskMixture) of each sub-run: one, or one per value of `vary_mixture`."""
    base = gin.get_configurable("TaskMixture")()
    if not vary_mixture:
        return [(workdir, base)]
    require(len(vary_mixture) == 1 and all(isinstance(v, (list, tuple)) and v
                                           for v in vary_mixture.values()),
            f"run.vary_mixture={vary_mixture!r} must map one TaskMixture field to a "
            f"non-empty list of values")
    (field, values), = vary_mixture.items()
    known = [f.name for f in dataclasses.fields(TaskMixture)]
    require(field in known, f"run.vary_mixture: {field!r} is not one of {known}")
    return [(os.path.join(workdir, f"{field}={value}"),
             dataclasses.replace(base, **{field: value})) for value in values]


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
        print(f"rareret: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"rareret: error: {e}", file=sys.stderr)
        sys.exit(1)


def run_main() -> None:
    app.run(main, argv=rewrite_gin_args(sys.argv))


if __name__ == "__main__":
    run_main()

"""The `rareret` command: absl flags + gin configs, t5x style.

    rareret --gin_file=gin_configs/synthetic/default.gin --workdir=runs/default \\
        [--gin_file=more.gin] [--gin_bindings='Sweep.num_steps = 500'] [--gin.Sweep.seeds=[0,1]]

gin binds the spec dataclasses here, at the edge; library code takes plain arguments. Every bad
value, binding or path ends the run with one line on stderr and exit status 2, before anything in
the workdir is touched.
"""

from __future__ import annotations

import os
import shutil
import sys

import gin
from absl import app, flags

from rareret.errors import ConfigError, require
from rareret.synthetic import sweep as sweep_lib
from rareret.synthetic import tasks

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "gin config file(s); later files override earlier.")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings such as 'Sweep.num_steps = 500'.")
flags.DEFINE_multi_string("gin_search_paths", ["."], "directories searched for gin files.")
flags.DEFINE_string("workdir", None, "run directory (config, metrics, report).")
flags.DEFINE_bool("overwrite", False, "replace a run already in --workdir.")
flags.DEFINE_bool("report", True, "write the report when the run ends.")

TaskMixture = gin.external_configurable(tasks.TaskMixture, name="TaskMixture")
Sweep = gin.external_configurable(sweep_lib.Sweep, name="Sweep")
EXPERIMENTS = ("synthetic",)
RUN_MARKER = "spec.json"  # Present in every workdir that holds a run.


@gin.configurable("run", denylist=["workdir"])
def run(workdir: str, experiment: str = "synthetic") -> None:
    """Builds the experiment's specs from gin (validating them), then runs it in `workdir`."""
    require(experiment in EXPERIMENTS,
            f"run.experiment={experiment!r} is not one of {list(EXPERIMENTS)}")
    mixture, sweep = TaskMixture(), Sweep()
    sweep.check_against(mixture)
    prepare_workdir(workdir, FLAGS.overwrite)
    with open(os.path.join(workdir, "config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    sweep_lib.run_sweep(mixture, sweep, workdir)
    if FLAGS.report:
        from rareret.analysis import report  # matplotlib loads only when a report is wanted.
        print(f"report: {report.write_report(workdir)}")


def prepare_workdir(workdir: str, overwrite: bool) -> None:
    """Creates `workdir`, refusing to mix a new run into an old one unless told to replace it."""
    require(not os.path.exists(workdir) or os.path.isdir(workdir),
            f"--workdir={workdir} exists and is not a directory")
    if os.path.exists(os.path.join(workdir, RUN_MARKER)):
        require(overwrite, f"--workdir={workdir} already holds a run; choose another workdir "
                           f"or pass --overwrite to replace it")
        for name in ("metrics", "report", RUN_MARKER, "config.gin"):
            path = os.path.join(workdir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_probe")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir} is not writable: {e.strerror}") from e


def parse_gin(files: list[str], bindings: list[str], search_paths: list[str]) -> None:
    """Parses gin files and bindings, turning gin's errors into one-line ConfigErrors."""
    for path in search_paths:
        gin.add_config_file_search_path(path)
    for path in files:
        require(any(os.path.isfile(os.path.join(root, path)) for root in search_paths)
                or os.path.isfile(path), f"--gin_file={path}: no such file")
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=True)
    except Exception as e:  # gin raises many types (ValueError, SyntaxError, ...) with context.
        raise ConfigError(f"gin config: {one_line(e)}") from e


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def rewrite_gin_args(argv: list[str]) -> list[str]:
    """Turns t5x-style `--gin.X=Y` arguments into `--gin_bindings=X=Y`."""
    return [f"--gin_bindings={arg[len('--gin.'):]}" if arg.startswith("--gin.") else arg
            for arg in argv]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        require(FLAGS.workdir, "--workdir is required")
        parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
        run(FLAGS.workdir)
    except ConfigError as e:
        # gin appends "In call to configurable ..." context lines; the first line is the message.
        print(f"rareret: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


def run_main() -> None:
    app.run(main, argv=rewrite_gin_args(sys.argv))


if __name__ == "__main__":
    run_main()

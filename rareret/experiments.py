"""`rareret-experiments`: every study of experiments/ in one command, and one index page.

    rareret-experiments [--root=runs/experiments] [--only=rank1,retention] [--variant=cpu|paper]
        [--list] [--dry_run]

Runs each selected study's runs (`rareret.analysis.studies`: a `rareret` run or a `rareret-grid`
grid per job, gin files under experiments/) one after another as subprocesses in ROOT/<job>,
skipping finished ones (so a re-run resumes where it stopped), then reads every study whose runs
are finished, selected or not, and writes ROOT/index.md: per study the paper's figures, the
command, what the paper reports, what was measured here, a verdict, the minutes each run took
(ROOT/minutes/) and the figures (ROOT/figures/<study>/). A failed job is reported and the others
carry on (exit status 1 at the end); a verdict of "not reproduced" is a finding, not an error.
SIGTERM or Ctrl-C reaches the running job, which checkpoints; nothing more runs and a re-run
resumes. Run it from the repository root; several runners may share a ROOT.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from absl import app, flags

from rareret import cli_flags
from rareret.analysis import grid_report, studies
from rareret.child_process import ChildProcess
from rareret.errors import ConfigError, one_line, require

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(cli_flags)  # --dry_run, in --help.
flags.DEFINE_string("root", None, "where the runs and index.md go (default: runs/experiments, "
                    "or runs/experiments-paper with --variant=paper).")
flags.DEFINE_list("only", None, "run only these studies (names as --list prints them).")
flags.DEFINE_enum("variant", "cpu", ["cpu", "paper"], "CPU-scale configs, or the paper's scale "
                  "(accelerators).")
flags.DEFINE_string("experiments_dir", "experiments", "the folder holding the studies' configs.")
flags.DEFINE_bool("list", False, "list the studies and their commands; run nothing.")

MINUTES_DIR = "minutes"  # ROOT/minutes/<job>.json: each job's wall-clock minutes.


class Stopped(Exception):
    """SIGTERM or Ctrl-C: the running job checkpointed; nothing more runs."""


def selected() -> list[studies.Study]:
    names = [s.name for s in studies.STUDIES]
    for name in FLAGS.only or []:
        require(name in names, f"--only: {name!r} is not a study; studies: {', '.join(names)}")
    return [s for s in studies.STUDIES if not FLAGS.only or s.name in FLAGS.only]


def jobs_of(study: studies.Study) -> tuple[studies.Job, ...]:
    return study.cpu if FLAGS.variant == "cpu" else study.paper


def command(job: studies.Job, root: str) -> list[str]:
    """The job's command line (module form, so the current interpreter runs it)."""
    module = "rareret.grid" if job.grid else "rareret.main"
    return [sys.executable, "-m", module,
            f"--gin_file={os.path.join(FLAGS.experiments_dir, job.config)}",
            f"--workdir={os.path.join(root, job.name)}"]


def shown(job: studies.Job, root: str) -> str:
    """The command as a user types it."""
    if job.config is None:
        return "(computed, no run)"
    tool = "rareret-grid" if job.grid else "rareret"
    return (f"`{tool} --gin_file={os.path.join(FLAGS.experiments_dir, job.config)} "
            f"--workdir={os.path.join(root, job.name)}`")


def finished(job: studies.Job, root: str) -> bool:
    workdir = os.path.join(root, job.name)
    if job.config is None:
        return True
    if not job.grid:
        return grid_report.finished(workdir)
    try:
        manifest = grid_report.read_manifest(workdir)
    except ConfigError:
        return False
    return all(grid_report.finished(os.path.join(workdir, c["name"])) for c in manifest["cells"])


def run_jobs(jobs: list[studies.Job], root: str) -> dict[str, str]:
    """Runs the unfinished jobs; {job: failure line} for those that failed."""
    failures = {}
    for job in jobs:
        if finished(job, root):
            print(f"{job.name}: finished, skipped", flush=True)
            continue
        argv = command(job, root)
        print(f"{job.name}: {' '.join(argv[2:])}", flush=True)
        start = time.perf_counter()
        code, last = ChildProcess(argv).run()
        if ChildProcess.signalled:
            raise Stopped(f"stopped in {job.name}; re-run the same command to resume")
        if code:
            failures[job.name] = f"failed (exit status {code})"
            print(f"{job.name}: {failures[job.name]}: {last}", flush=True)
            continue
        _write_json(os.path.join(root, MINUTES_DIR, f"{job.name}.json"),
                    round((time.perf_counter() - start) / 60, 1))
    return failures


def observe(study: studies.Study, root: str, failures: dict[str, str]) -> studies.Observation:
    jobs = jobs_of(study)
    failed = [failures[j.name] for j in jobs if j.name in failures]
    if failed:
        return studies.Observation("", failed[0])
    if not all(finished(j, root) for j in jobs):
        return studies.Observation("", "not run")
    out = os.path.join(root, "figures", study.name)
    os.makedirs(out, exist_ok=True)
    try:
        return study.observe({j.name: os.path.join(root, j.name) for j in jobs}, out)
    except Exception as e:  # A study's reader must not take the index down.
        traceback.print_exc()
        return studies.Observation("", f"failed: {one_line(e)}")


def index_page(rows: list[tuple[studies.Study, studies.Observation]], root: str) -> str:
    lines = [f"# rareret experiments ({FLAGS.variant} scale)", "",
             "Written by `rareret-experiments`; the studies are described in experiments/README.md"
             " (what each figure shows, the paper's numbers, the paper-scale configs).", "",
             "| study | paper | expected (paper) | observed here | verdict | minutes |",
             "|---|---|---|---|---|---|"]
    for study, seen in rows:
        minutes = sum(_read_json(os.path.join(root, MINUTES_DIR, f"{j.name}.json"), 0)
                      for j in jobs_of(study) if j.config)
        cells = [f"[{study.name}](#{study.name})", study.figures, study.expected,
                 seen.observed or "–", f"**{seen.verdict}**", str(minutes or "–")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    for study, seen in rows:
        lines += ["", f"## {study.name}", "", f"{study.title} ({study.figures}).", "",
                  "Command: " + "; ".join(shown(j, root) for j in jobs_of(study)), "",
                  f"Expected: {study.expected}.", "", f"Observed: {seen.observed or '–'}", "",
                  f"Verdict: **{seen.verdict}**"]
        lines += [f"\n![{study.name}]({os.path.relpath(f, root)})" for f in seen.figures]
    path = os.path.join(root, "index.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _read_json(path: str, missing):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return missing


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        chosen = selected()
        require(os.path.isdir(FLAGS.experiments_dir),
                f"--experiments_dir={FLAGS.experiments_dir}: no such folder (run from the "
                f"repository root)")
        root = FLAGS.root or ("runs/experiments" if FLAGS.variant == "cpu"
                              else "runs/experiments-paper")
        jobs = list({j.name: j for s in chosen for j in jobs_of(s)}.values())
        if FLAGS.list or cli_flags.DRY_RUN.value:
            for study in chosen:
                print(f"{study.name} ({study.figures}): "
                      + "; ".join(shown(j, root) for j in jobs_of(study)))
            return
        os.makedirs(root, exist_ok=True)
        failures = run_jobs([j for j in jobs if j.config], root)
        rows = [(study, observe(study, root, failures)) for study in studies.STUDIES]
        print(f"index: {index_page(rows, root)}")
        for study, seen in rows:
            if study in chosen:
                print(f"  {study.name:<20} {seen.verdict}")
    except ConfigError as e:
        print(f"rareret-experiments: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"rareret-experiments: {e}", file=sys.stderr)
        sys.exit(0)
    if failures:
        sys.exit(1)


def run_main() -> None:
    app.run(main)


if __name__ == "__main__":
    run_main()

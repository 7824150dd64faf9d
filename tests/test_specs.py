"""Specs, theory and analysis load without JAX: an analyst reads a run's `spec.json` back into
the spec dataclasses, and the theory and report modules, in a process that never imports jax."""

import json
import subprocess
import sys

from rareret.synthetic.spec import TaskMixture

NO_JAX = """
import json, sys
from rareret.analysis import phase, report, retention
from rareret.analysis import analyze, dataset, open_run  # xarray, no JAX
from rareret.lm.spec import LmTrain
from rareret.mesh_spec import MeshSpec
from rareret.synthetic import spec, theory
from rareret.lm import config, inject, ladder
spec_json = json.loads(sys.argv[1])
mixture = spec.TaskMixture(**spec_json["mixture"])
theory.predicted_loss(mixture, spec_json["sweep"]["widths"])
LmTrain(tasks=(inject.TaskSpec(kind="add", name="add", every_n=2),), mesh=MeshSpec())
config.param_count(ladder.config_for("4M"))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax"))
print(json.dumps(loaded))
"""


def test_specs_theory_and_analysis_import_no_jax():
    spec_json = {"mixture": vars(TaskMixture(num_tasks=4, task_dim=2, input_dim=8)),
                 "sweep": {"widths": [2, 4, 8]}}
    proc = subprocess.run([sys.executable, "-c", NO_JAX, json.dumps(spec_json)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []

"""The LM run report (rareret/analysis/lm_report.py) and `rareret-report`'s dispatch on
spec.json's experiment (rareret/analysis/report.py).

The metric stores here are real (`store.MetricWriter`) but their numbers are made up, chosen so
that every cell of the report's task table is known: 5 records at steps 0, 10, 20, 30, 40, two
tasks (cmp, add), probes at steps 0, 20, 30 (not at the last record, so "final" must be the last
measured one), gradients at steps 10 and 30, NaN elsewhere as the training loop writes them.
"""

import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np

from rareret import store
from rareret.lm import inject, ladder
from rareret.lm.spec import LmTrain

REPO = pathlib.Path(__file__).resolve().parents[1]
NAN = np.nan
STEPS = np.array([0, 10, 20, 30, 40])
TASKS = ["cmp", "add"]
N_LAYERS = ladder.config_for("tiny").n_layers  # 2: layers 0..2, blocks 0..1.
PROBED = [0, 2, 3]  # Records with probes and ablations.
GRADIENT_RECORDS = [1, 3]
PARTS = ["all", "task_tokens", "other_tokens"]

SPEC = LmTrain(model="tiny", data="/data/golden.jsonl.gz", seq_len=32, global_batch=8,
               num_steps=40, warmup_steps=2, record_every=10,
               tasks=(inject.TaskSpec("cmp", "cmp", frequency_per_token=1e-3, seed=1),
                      inject.TaskSpec("add", "add", every_n=2, seed=2)))


def write_spec(workdir: pathlib.Path, spec: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(json.dumps(spec, indent=2))


def lm_spec_json(spec: LmTrain = SPEC) -> dict:
    """spec.json as `rareret.lm.train.spec_dict` writes it (without importing JAX)."""
    return {"experiment": "lm", "lm": json.loads(json.dumps(dataclasses.asdict(spec),
                                                            default=list))}


def base_arrays() -> dict[str, np.ndarray]:
    return {
        "step": STEPS,
        "lm_loss": np.array([NAN, 5.0, 4.0, 3.5, 3.2]),
        "val_loss": np.array([6.0, 5.1, 4.2, 3.6, 3.3]),
        "task_loss": np.array([[NAN, NAN], [2.0, NAN], [1.0, 4.0], [0.6, 3.5], [0.5, 3.0]]),
        "task_accuracy": np.array([[0.0, 0.0], [0.2, 0.0], [0.55, 0.01], [0.8, 0.02],
                                   [0.75, 0.03]]),
    }


def optional_arrays() -> dict[str, np.ndarray]:
    records, layers = len(STEPS), N_LAYERS + 1
    r2 = np.full((records, 2, layers), NAN)
    null = np.full((records, 2, layers), NAN)
    modes = np.full((records, 2, layers), NAN)
    power = np.full((records, 2, layers, 50), NAN)
    ablation = np.full((records, 2, N_LAYERS), NAN)
    for i, r in enumerate(PROBED):
        r2[r, 0] = [0.1, 0.2 + 0.25 * i, 0.4]  # Record 3: [0.1, 0.7, 0.4] → layer 1.
        null[r, 0] = [-0.5, -0.4, -0.6]
        modes[r, 1] = [0, i, 3]  # Record 3: 0 + 2 + 3 = 5 modes.
        power[r, 1] = np.random.default_rng(r).dirichlet(np.ones(50), size=layers)
    ablation[3] = [[0.1, 1.0], [0.9, 0.1]]  # Rises in task loss per block.
    ablation[2] = [[0.5, 0.6], [0.6, 0.7]]
    cosine = np.full((records, 2, 3), NAN)
    interference = np.full((records, 3, 3), NAN)
    for r in GRADIENT_RECORDS:
        cosine[r] = [[0.3, 0.9, -0.1], [0.2, 0.8, 0.0]]
        interference[r] = np.array([[1, 0.1, -0.2], [0.1, 1, 0.3], [-0.2, 0.3, 1]])
    return {"probe_r2": r2, "probe_r2_null": null, "fourier_power": power,
            "fourier_modes": modes, "mlp_ablation": ablation, "grad_cosine": cosine,
            "interference": interference}


def record_specs(arrays: dict[str, np.ndarray], task_names=TASKS) -> dict[str, store.RecordSpec]:
    tasks = {"tasks": list(task_names)}
    axes = {"step": (), "lm_loss": (), "val_loss": (), "task_loss": ("task",),
            "task_accuracy": ("task",), "probe_r2": ("task", "layer"),
            "probe_r2_null": ("task", "layer"), "fourier_modes": ("task", "layer"),
            "fourier_power": ("task", "layer", "frequency"), "mlp_ablation": ("task", "block"),
            "grad_cosine": ("task", "part"), "interference": ("task_i", "task_j")}
    attrs = {"grad_cosine": {**tasks, "parts": PARTS},
             "interference": {"tasks": [*task_names, "text"]}}
    return {name: store.RecordSpec(values.shape[1:],
                                   np.int64 if name == "step" else np.float32, axes[name],
                                   attrs.get(name, tasks if axes[name] else {}))
            for name, values in arrays.items()}


def make_run(workdir: pathlib.Path, arrays: dict[str, np.ndarray], spec: LmTrain = SPEC,
             split_at: int = 2) -> pathlib.Path:
    """An LM workdir: spec.json and a store holding `arrays`, appended in two batches."""
    write_spec(workdir, lm_spec_json(spec))
    writer = store.MetricWriter.create(workdir / "metrics",
                                       record_specs(arrays, [t.name for t in spec.tasks]))
    writer.append({name: values[:split_at] for name, values in arrays.items()})
    writer.append({name: values[split_at:] for name, values in arrays.items()})
    return workdir


def report_cli(workdir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rareret.analysis.report", str(workdir)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def table_rows(text: str) -> dict[str, list[str]]:
    """The task table's rows by task name, as lists of cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| `"):
            rows[cells[0].strip("`")] = cells
    return rows


def test_full_report_without_jax(tmp_path):
    workdir = make_run(tmp_path / "run", {**base_arrays(), **optional_arrays()})
    # The report reads with numpy only: write it in a process that must never import JAX.
    code = ("import sys; from rareret.analysis import report; "
            "print(report.write_report(sys.argv[1])); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'jaxlib', 'flax', 'optax', 'orbax')); assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code, str(workdir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / "report"
    assert proc.stdout.strip() == str(out / "report.md")
    for name in ("losses.png", "tasks.png", "representations.png", "ablation.png",
                 "gradients.png", "interference.png"):
        assert (out / name).stat().st_size > 1000, name
        assert f"]({name})" in (out / "report.md").read_text()
    text = (out / "report.md").read_text()
    # Settings from spec.json.
    for fragment in ("model `tiny`", "data `/data/golden.jsonl.gz`", "40 steps",
                     "batch 8 × seq_len 32", "records: 5 committed, last step 40 of 40",
                     "`cmp`: cmp, frequency 0.001 per token", "`add`: add, every_n=2",
                     "final train loss 3.200, validation loss 3.300"):
        assert fragment in text, fragment
    rows = table_rows(text)
    assert rows["cmp"] == ["`cmp`", "cmp", "0.500", "0.750", "0.800", "20",
                           "R² 0.700 (layer 1; null -0.400; step 30)",
                           "block 1 (+1.000; step 30)"]
    assert rows["add"] == ["`add`", "add", "3.000", "0.030", "0.030", "never",
                           "5 modes (sum over layers; step 30)", "block 0 (+0.900; step 30)"]
    assert "at step 30" in text.split("## Gradient interference")[1]


def test_report_without_optional_arrays(tmp_path):
    workdir = make_run(tmp_path / "run", base_arrays())
    proc = report_cli(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / "report"
    assert sorted(p.name for p in out.iterdir()) == ["losses.png", "report.md", "tasks.png"]
    text = (out / "report.md").read_text()
    assert "## Representations" not in text and "ablation" not in text.lower()
    rows = table_rows(text)
    assert rows["cmp"] == ["`cmp`", "cmp", "0.500", "0.750", "0.800", "20"]
    assert rows["add"] == ["`add`", "add", "3.000", "0.030", "0.030", "never"]


def test_report_of_a_plain_lm_run_and_a_run_in_progress(tmp_path):
    """No tasks (task arrays of width 0); then a store read after only one committed record,
    with rows written past the counter (a record in flight) that must stay invisible."""
    arrays = {name: (values[:, :0] if values.ndim > 1 else values)
              for name, values in base_arrays().items()}
    workdir = make_run(tmp_path / "plain", arrays, dataclasses.replace(SPEC, tasks=()))
    assert report_cli(workdir).returncode == 0
    text = (workdir / "report" / "report.md").read_text()
    assert "tasks: none" in text and "## Tasks" not in text
    assert (workdir / "report" / "losses.png").exists()

    workdir = make_run(tmp_path / "live", base_arrays(), split_at=1)
    writer = store.MetricWriter.open(workdir / "metrics")
    writer.truncate(1)  # As if only the first record were committed ...
    writer._write_rows(1, {name: np.asarray(v[1:2], np.int64 if name == "step" else np.float32)
                           for name, v in base_arrays().items()})  # ... and one in flight.
    proc = report_cli(workdir)
    assert proc.returncode == 0
    assert "Warning" not in proc.stderr, proc.stderr  # Plots of all-NaN lines: no empty legends.
    text = (workdir / "report" / "report.md").read_text()
    assert "records: 1 committed, last step 0 of 40" in text
    assert table_rows(text)["cmp"][2:6] == ["–", "0.000", "0.000", "never"]


def assert_one_line_error(proc, expected: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert proc.stderr.strip().splitlines() == [expected]


def test_dispatch_errors(tmp_path):
    write_spec(tmp_path / "other", {"experiment": "counter"})
    assert_one_line_error(report_cli(tmp_path / "other"),
                          f"rareret-report: error: {tmp_path / 'other'} holds a run of "
                          f"experiment 'counter'; rareret-report knows ['synthetic', 'lm']")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(report_cli(tmp_path / "empty"),
                          f"rareret-report: error: {tmp_path / 'empty'} holds no rareret run "
                          f"(no spec.json)")
    write_spec(tmp_path / "lm_no_records", lm_spec_json())
    store.MetricWriter.create(tmp_path / "lm_no_records" / "metrics",
                              record_specs(base_arrays()))
    assert_one_line_error(report_cli(tmp_path / "lm_no_records"),
                          f"rareret-report: error: {tmp_path / 'lm_no_records'}: the run has no "
                          f"committed records yet")


def test_lm_run_without_metric_store_is_one_line_error(tmp_path):
    write_spec(tmp_path / "run", lm_spec_json())
    proc = report_cli(tmp_path / "run")
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("rareret-report: error: ") and "not a metric store" in line

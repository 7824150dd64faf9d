"""`rareret-probe das` (rareret/lm/probe_cli.py) on a real tiny LM run made by the `rareret` CLI
(6 steps, checkpoints at 3 and 6; the data shard and tokenizer of tests/test_lm_train.py), and
`rareret-report` on the same run."""

import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from lm_corpus import golden_documents
from rareret.lm import data, ladder, probe_cli
from xla_cache import FAST_COMPILE

REPO = pathlib.Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "data" / "lm_tokenizer.json"
N_LAYERS = ladder.config_for("tiny").n_layers


def env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE}  # One CPU device.


def python(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("probe_cli")
    shard = data.write_shard(root / "golden.jsonl.gz", golden_documents())
    workdir = root / "run"
    bindings = ["LmTrain.num_steps = 6", "LmTrain.warmup_steps = 2", "LmTrain.record_every = 3",
                "LmTrain.checkpoint_every = 3", "LmTrain.seq_len = 32",
                "LmTrain.global_batch = 8", f"LmTrain.data = '{shard}'",
                f"LmTrain.tokenizer = '{TOKENIZER}'"]
    proc = python("-m", "rareret.main", "--gin_file=gin_configs/lm/tiny.gin",
                  f"--workdir={workdir}", "--noprogress", "--noreport",
                  *[f"--gin_bindings={b}" for b in bindings])
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert probe_cli.checkpoint_steps(str(workdir)) == [3, 6]
    return workdir


def test_console_script_is_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rareret-probe"] == "rareret.lm.probe_cli:run_main"


def test_das_table_and_json(lm_run):
    proc = python("-m", "rareret.lm.probe_cli", "das", str(lm_run), "--steps", "50",
                  "--pairs", "200", "--layers", "0,1")
    assert proc.returncode == 0, proc.stderr[-5000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"DAS on {lm_run}, step 6: task 'cmp', variable X, position 1")
    assert lines[1].split() == ["layer", "train", "IIA", "held-out", "IIA", "final", "loss",
                                "seconds"]
    table = [line.split() for line in lines[2:4]]
    assert [row[0] for row in table] == ["0", "1"]
    result_path = lm_run / "report" / "das_step6.json"
    assert lines[4] == f"wrote {result_path}"
    result = json.loads(result_path.read_text())
    assert {k: result[k] for k in ("step", "task", "variable", "position", "read_position", "k",
                                   "steps", "pairs")} == {
        "step": 6, "task": "cmp", "variable": "X", "position": 1, "read_position": 1, "k": 1,
        "steps": 50, "pairs": 200}
    assert [row["layer"] for row in result["layers"]] == [0, 1]
    for row, printed in zip(result["layers"], table):
        for key in ("train_iia", "test_iia"):
            assert 0.0 <= row[key] <= 1.0
            # 200 pairs: IIA is a multiple of 1/200.
            assert row[key] * 200 == pytest.approx(round(row[key] * 200))
        assert float(printed[1]) == pytest.approx(row["train_iia"], abs=5e-4)
        assert float(printed[2]) == pytest.approx(row["test_iia"], abs=5e-4)


def test_report_of_the_real_run(lm_run, tmp_path):
    proc = python("-m", "rareret.analysis.report", str(lm_run), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (lm_run / "report" / "report.md").read_text()
    assert "records: 3 committed, last step 6 of 6" in text
    assert re.search(r"^\| `cmp` \| cmp \| ", text, re.M)
    assert re.search(r"^\| `add` \| add \| ", text, re.M)
    for name in ("losses.png", "tasks.png"):
        assert (lm_run / "report" / name).stat().st_size > 1000


def one_line_error(capsys, argv) -> str:
    assert probe_cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("rareret-probe: error: "), lines[0]
    return lines[0]


def test_bad_input_is_one_line_error(lm_run, tmp_path, capsys):
    run = str(lm_run)
    assert "holds no rareret run (no spec.json)" in one_line_error(capsys, ["das", str(tmp_path)])
    other = tmp_path / "synthetic"
    other.mkdir()
    (other / "spec.json").write_text(json.dumps({"experiment": "synthetic"}))
    assert one_line_error(capsys, ["das", str(other)]).endswith(
        "holds a run of experiment 'synthetic'; rareret-probe probes LM runs only")
    assert one_line_error(capsys, ["das", run, "--step", "4"]).endswith(
        "--step=4: no checkpoint at that step; checkpoints: [3, 6]")
    assert one_line_error(capsys, ["das", run, "--task", "add"]).endswith(
        "--task='add' is not a cmp task of the run; its cmp tasks: ['cmp']")
    assert f"layers are 0 (embeddings) to {N_LAYERS}" in one_line_error(
        capsys, ["das", run, "--layers", f"0,{N_LAYERS + 1}"])
    assert "--layers='1,x'" in one_line_error(capsys, ["das", run, "--layers", "1,x"])
    assert "--variable='Z'" in one_line_error(capsys, ["das", run, "--variable", "Z"])
    assert "--position=2" in one_line_error(capsys, ["das", run, "--position", "2"])
    assert "--k" in one_line_error(capsys, ["das", run, "--k", "many"])
    assert "(see rareret-probe" in one_line_error(capsys, ["fit", run])
    no_checkpoints = tmp_path / "fresh"
    no_checkpoints.mkdir()
    (no_checkpoints / "spec.json").write_text((lm_run / "spec.json").read_text())
    assert one_line_error(capsys, ["das", str(no_checkpoints)]).endswith("holds no checkpoint yet")
    assert not (no_checkpoints / "checkpoints").exists()  # Nothing written.
    # The console entry point: the same line and exit status 2.
    proc = python("-m", "rareret.lm.probe_cli", "das", run, "--step", "5", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "rareret-probe: error: --step=5: no checkpoint at that step; checkpoints: [3, 6]"]

"""`rareret.analysis.open_run` (rareret/analysis/dataset.py) on real runs: a finished sweep, a
sweep read while it runs (committed records only), and an LM run with probes and gradients."""

import json
import pathlib

import numpy as np
import pytest
import xarray as xr

from lm_corpus import golden_documents
from rareret import store
from rareret.analysis import open_run
from rareret.analysis.dataset import to_netcdf
from rareret.errors import ConfigError
from rareret.lm import data, inject, ladder, train
from rareret.lm.spec import LmTrain
from rareret.run import Run
from rareret.synthetic.spec import Sweep, TaskMixture
from rareret.synthetic.sweep import SweepProgram
from xla_cache import persistent_compilation_cache

TOKENIZER = pathlib.Path(__file__).resolve().parent / "data" / "lm_tokenizer.json"
MIXTURE = TaskMixture(num_tasks=4, task_dim=2, input_dim=8, beta=1.0)
SWEEP = Sweep(widths=(2, 3), seeds=(0, 1), learning_rate=(1e-3, 1e-2), batch_size=32,
              num_steps=30, record_every=10, warmup_steps=5, interference_every=10)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The live run compiles the finished run's programs again, and takes them from the cache."""
    with persistent_compilation_cache(tmp_path_factory.mktemp("xla_cache")):
        yield


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("sweep")
    Run(SweepProgram(MIXTURE, SWEEP), str(workdir), show_progress=False).execute()
    return workdir


def test_finished_sweep_dims_coords_and_values(sweep_run):
    ds = open_run(sweep_run)
    assert dict(ds.sizes) == {"record": 4, "model": 8, "task": 4, "task_i": 4, "task_j": 4,
                              "direction": 2}
    assert ds.task_loss.dims == ("record", "model", "task")
    assert ds.interference.dims == ("record", "model", "task_i", "task_j")
    assert ds.step.values.tolist() == [0, 10, 20, 30]
    assert ds.width.values.tolist() == [2, 2, 2, 2, 3, 3, 3, 3]
    assert ds.seed.values.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    np.testing.assert_allclose(ds.learning_rate, [1e-3, 1e-2] * 4, rtol=1e-6)
    assert ds.gap.values.tolist() == [0] * 8
    assert ds.task.values.tolist() == [1, 2, 3, 4]  # The paper's k.
    assert ds.task_i.values.tolist() == ds.task_j.values.tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(ds.prior, MIXTURE.prior_array(), rtol=1e-6)
    assert set(ds.coords) == {"step", "width", "seed", "learning_rate", "gap", "task", "prior",
                              "frequent", "task_i", "task_j"}
    assert "spectrum" in ds.data_vars and ds.spectrum.dims == ("task", "direction")
    metrics = store.open_metrics(sweep_run / "metrics")
    for name in ("task_loss", "alignment", "delta_f", "diverged", "interference"):
        np.testing.assert_array_equal(ds[name].values, metrics.read(name))
        assert ds[name].attrs == {k: v for k, v in metrics.attrs(name).items() if k != "axes"}
    assert ds.attrs["experiment"] == "synthetic" and ds.attrs["committed_records"] == 4
    assert ds.attrs["spec"] == json.loads((sweep_run / "spec.json").read_text())
    # Selection by label works as documented: task k is the k-th row.
    np.testing.assert_array_equal(ds.task_loss.sel(task=4), ds.task_loss.isel(task=3))


def test_netcdf_round_trip(sweep_run, tmp_path):
    ds = open_run(sweep_run)
    to_netcdf(ds, tmp_path / "run.nc")
    back = xr.open_dataset(tmp_path / "run.nc", engine="scipy")
    np.testing.assert_array_equal(back.task_loss.values, ds.task_loss.values)
    assert back.width.values.tolist() == ds.width.values.tolist()
    assert json.loads(back.attrs["spec"]) == ds.attrs["spec"]


def test_live_run_shows_committed_records_only(tmp_path):
    run = Run(SweepProgram(MIXTURE, SWEEP), str(tmp_path), show_progress=False,
              record_delay=1e9)  # Records wait in memory until a commit.
    run.start()
    try:
        run.advance()
        run.advance()
        assert open_run(tmp_path).sizes["record"] == 0  # Taken, not committed.
        run.commit()
        ds = open_run(tmp_path)
        assert ds.step.values.tolist() == [0, 10, 20]
        assert ds.task_loss.shape == (3, 8, 4)
        run.advance()  # The last record: committed with the checkpoint.
        run.finish()
    finally:
        run.close()
    assert open_run(tmp_path).step.values.tolist() == [0, 10, 20, 30]
    # Rows written past the counter (a writer between its data and its commit) stay invisible.
    group = tmp_path / "metrics" / "zarr.json"
    meta = json.loads(group.read_text())
    meta["attributes"]["committed_records"] = 2
    group.write_text(json.dumps(meta))
    ds = open_run(tmp_path)
    assert ds.step.values.tolist() == [0, 10]
    assert ds.sizes["record"] == ds.task_loss.shape[0] == ds.interference.shape[0] == 2


def test_a_folder_without_a_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="holds no rareret run"):
        open_run(tmp_path)


def test_lm_run_dims_and_coords(tmp_path):
    shard = data.write_shard(tmp_path / "golden.jsonl.gz", golden_documents())
    tasks = (inject.TaskSpec(kind="cmp", name="less", frequency_per_token=2e-3, seed=1),
             inject.TaskSpec(kind="add", name="sum", every_n=2, seed=2))
    spec = LmTrain(model="tiny", data=str(shard), tokenizer=str(TOKENIZER), seq_len=32,
                   global_batch=8, num_steps=2, warmup_steps=1, record_every=2,
                   eval_instances=32, tasks=tasks, probe_every=2)
    workdir = tmp_path / "run"
    Run(train.LmProgram(spec), str(workdir), show_progress=False).execute()
    ds = open_run(workdir)
    n_layers = ladder.config_for("tiny").n_layers
    assert ds.step.values.tolist() == [0, 2]
    assert ds.task.values.tolist() == ["less", "sum"]
    assert ds.kind.values.tolist() == ["cmp", "add"]
    assert ds.layer.values.tolist() == list(range(n_layers + 1))
    assert ds.block.values.tolist() == list(range(n_layers))
    assert ds.frequency.values.tolist() == list(range(1, 51))
    assert ds.lm_loss.dims == ("record",)
    assert ds.task_accuracy.dims == ("record", "task")
    assert ds.probe_r2.dims == ("record", "task", "layer")
    assert ds.fourier_power.dims == ("record", "task", "layer", "frequency")
    assert ds.attrs["experiment"] == "lm" and ds.attrs["spec"]["lm"]["num_steps"] == 2
    # The T_CMP probe was measured for the cmp task only, by name.
    assert np.isfinite(ds.probe_r2.sel(task="less")).all()
    assert np.isnan(ds.probe_r2.sel(task="sum")).all()

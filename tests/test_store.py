"""The metric store: zarr-python sees exactly the committed records; crashes leave no trace."""

import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from rareret.errors import ConfigError
from rareret.store import Coord, MetricWriter, RecordSpec, open_metrics

M, T = 3, 4  # models, tasks


def _records():
    return {
        "step": RecordSpec((), np.int64, ()),
        "task_loss": RecordSpec((M, T), np.float32, ("model", "task"), {"units": "nats"}),
        "diverged": RecordSpec((M,), bool, ("model",)),
    }


def _coords():
    return {
        "width": Coord(np.array([8, 16, 32]), ("model",), {"description": "hidden width"}),
        "prior": Coord(np.full(T, 0.25, np.float32), ("task",), {"names": ["a", "b", "c", "d"]}),
    }


def _rows(r, k=None):
    """Record r (or records r..r+k-1 stacked) with value r + 1 everywhere."""
    if k is None:
        return {"step": r + 1, "task_loss": np.full((M, T), r + 1.0),
                "diverged": np.full(M, r % 2 == 1)}
    steps = np.arange(r, r + k)
    return {"step": steps + 1, "task_loss": np.broadcast_to(steps[:, None, None] + 1.0, (k, M, T)),
            "diverged": np.broadcast_to(steps[:, None] % 2 == 1, (k, M))}


def _check_rows(reader, n):
    expected = np.arange(1, n + 1)
    np.testing.assert_array_equal(reader.read("step"), expected)
    np.testing.assert_array_equal(reader.read("task_loss"),
                                  np.broadcast_to(expected[:, None, None], (n, M, T)))
    np.testing.assert_array_equal(reader.read("diverged"),
                                  np.broadcast_to(expected[:, None] % 2 == 0, (n, M)))


@pytest.fixture
def store(tmp_path):
    return MetricWriter.create(tmp_path / "metrics", _records(), _coords(), chunk_records=4)


def test_zarr_python_reads_committed_records(tmp_path, store):
    store.append(_rows(0))
    store.append(_rows(1, k=5))
    store.append(_rows(6))
    assert store.num_records == 7

    group = zarr.open_group(tmp_path / "metrics", mode="r")
    assert group.attrs["committed_records"] == 7
    assert set(group.array_keys()) == {"step", "task_loss", "diverged", "width", "prior"}
    loss = zarr.open_array(tmp_path / "metrics" / "task_loss", mode="r")
    assert loss.shape == (7, M, T) and loss.dtype == np.float32
    assert loss.metadata.dimension_names == ("record", "model", "task")
    assert loss.attrs["axes"] == ["record", "model", "task"] and loss.attrs["units"] == "nats"
    np.testing.assert_array_equal(loss[:, 1, 2], np.arange(1, 8))
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "metrics" / "step")[:],
                                  np.arange(1, 8))
    width = zarr.open_array(tmp_path / "metrics" / "width", mode="r")
    np.testing.assert_array_equal(width[:], [8, 16, 32])
    assert width.metadata.dimension_names == ("model",)
    assert width.attrs["description"] == "hidden width"

    reader = open_metrics(tmp_path / "metrics")
    assert reader.committed_records == 7
    assert reader.names() == ["step", "task_loss", "diverged", "width", "prior"]
    assert reader.axes("diverged") == ("record", "model")
    assert reader.attrs("prior")["names"] == ["a", "b", "c", "d"]
    assert reader.is_record("step") and not reader.is_record("width")
    np.testing.assert_array_equal(reader.read("prior"), np.full(T, 0.25))
    _check_rows(reader, 7)


def test_crash_before_commit_leaves_no_trace(tmp_path, store, monkeypatch):
    store.append(_rows(0, k=3))

    def crash(self, num_records):
        raise OSError("simulated crash between data and commit")

    monkeypatch.setattr(MetricWriter, "_commit", crash)
    with pytest.raises(OSError, match="simulated crash"):
        store.append(_rows(3, k=2))
    monkeypatch.undo()
    assert zarr.open_array(tmp_path / "metrics" / "step").shape == (5,)  # written, uncommitted.

    reader = open_metrics(tmp_path / "metrics")
    assert reader.committed_records == 3
    _check_rows(reader, 3)

    resumed = MetricWriter.open(tmp_path / "metrics")
    assert resumed.num_records == 3
    assert zarr.open_array(tmp_path / "metrics" / "task_loss").shape == (3, M, T)
    resumed.append(_rows(3))
    resumed.append(_rows(4, k=6))
    assert reader.refresh() == 10
    _check_rows(reader, 10)


def test_truncate(tmp_path, store):
    store.append(_rows(0, k=10))
    store.truncate(6)
    assert store.num_records == 6
    assert zarr.open_array(tmp_path / "metrics" / "step").shape == (6,)
    store.append(_rows(6, k=3))
    _check_rows(open_metrics(tmp_path / "metrics"), 9)
    with pytest.raises(ConfigError, match="num_records=10"):
        store.truncate(10)


def test_append_validates_rows(store):
    rows = _rows(0)
    with pytest.raises(ConfigError, match="missing metrics \\['diverged'\\]"):
        store.append({k: v for k, v in rows.items() if k != "diverged"})
    with pytest.raises(ConfigError, match="unknown metrics \\['extra'\\]"):
        store.append({**rows, "extra": 1.0})
    with pytest.raises(ConfigError, match="'task_loss': got shape \\(4, 3\\)"):
        store.append({**rows, "task_loss": np.zeros((T, M))})
    with pytest.raises(ConfigError, match="'step': dtype float64 cannot be stored as int64"):
        store.append({**rows, "step": 1.5})
    with pytest.raises(ConfigError, match="disagree on the number of rows"):
        store.append({**_rows(0, k=2), "step": np.arange(3)})
    assert store.num_records == 0


def test_create_and_open_refuse_bad_paths(tmp_path, store):
    with pytest.raises(ConfigError, match="already holds a metric store"):
        MetricWriter.create(tmp_path / "metrics", _records())
    MetricWriter.create(tmp_path / "metrics", _records(), overwrite=True)
    assert open_metrics(tmp_path / "metrics").names() == list(_records())

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'other'} is not a metric store"):
        MetricWriter.create(tmp_path / "other", _records(), overwrite=True)
    assert (tmp_path / "other" / "notes.txt").exists()
    for path in (tmp_path / "missing", tmp_path / "other"):
        with pytest.raises(ConfigError, match=f"{path} is not a metric store"):
            open_metrics(path)
        with pytest.raises(ConfigError, match=f"{path} is not a metric store"):
            MetricWriter.open(path)
    with pytest.raises(ConfigError, match="axis name 'record' is reserved"):
        MetricWriter.create(tmp_path / "bad", {"x": RecordSpec((2,), np.float32, ("record",))})
    with pytest.raises(ConfigError, match="'cos': axes \\['task', 'task'\\] repeat a name"):
        MetricWriter.create(tmp_path / "bad", {"cos": RecordSpec((T, T), np.float32,
                                                                 ("task", "task"))})
    with pytest.raises(ConfigError, match="no metric 'nope'"):
        open_metrics(tmp_path / "metrics").read("nope")


_APPENDER = """
import sys
import numpy as np
from rareret.store import MetricWriter
writer = MetricWriter.open(sys.argv[1])
for r in range({n}):
    writer.append({{"step": r + 1, "loss": np.full(({m}, {t}), r + 1.0)}})
"""


def test_concurrent_reader_sees_whole_records(tmp_path):
    path, n = tmp_path / "metrics", 200
    MetricWriter.create(path, {"step": RecordSpec((), np.int64, ()),
                               "loss": RecordSpec((M, T), np.float32, ("model", "task"))},
                        chunk_records=8)
    appender = subprocess.Popen([sys.executable, "-c", _APPENDER.format(n=n, m=M, t=T), str(path)])
    reader, last, last_naive, reads = open_metrics(path), 0, 0, 0
    deadline = time.monotonic() + 30
    while last < n:
        assert time.monotonic() < deadline, "appender too slow"
        count = reader.refresh()
        assert count >= last
        step, loss = reader.read("step"), reader.read("loss")
        assert len(step) == len(loss) == count
        np.testing.assert_array_equal(step, np.arange(1, count + 1))
        np.testing.assert_array_equal(loss, np.broadcast_to(step[:, None, None], (count, M, T)))
        naive = zarr.open_array(path / "loss", mode="r")[:]  # no counter: shape alone.
        assert len(naive) >= last_naive
        np.testing.assert_array_equal(naive[:, 2, 3], np.arange(1, len(naive) + 1))
        last, last_naive, reads = count, len(naive), reads + 1
    assert appender.wait(timeout=10) == 0
    assert reads > 10

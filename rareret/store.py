"""Append-only metric arrays in a run's `<workdir>/metrics/` (the product's data contract).

Layout, zarr v3, readable with zarr-python / xarray without rareret:

    metrics/zarr.json   group; attributes {"committed_records": n,
                        "record_arrays": [...], "coord_arrays": [...]}
    metrics/<name>/     one zarr3 array per metric (tensorstore, zstd), with `dimension_names`
                        and attributes {"axes": [...same names...], **caller attrs}

Record arrays (`step`, `task_loss`, ...) have leading axis "record" and grow by one row per
record, in chunks of `chunk_records` rows spanning the other axes whole. Coordinate arrays
(`width`, `seed`, `prior`, ...) are written once at creation. Only bool/int/uint/float dtypes are
stored; put names (e.g. task names) in a coordinate's attrs. Axis names within an array must be
distinct (tensorstore refuses repeats, xarray mishandles them): a task×task matrix has axes
(..., "task_i", "task_j").

Commit protocol (one writer; the file kvstore has no locking): `append` writes the new rows,
then grows each array's shape, then publishes `committed_records` by atomically replacing
`metrics/zarr.json`. The rows go through a second tensorstore handle that assumes the array's
metadata with a huge leading extent (zarr3 chunks do not depend on the shape), and the array is
grown afterwards by a metadata-only resize. Resize-then-write would let even a naive
`zarr.open_array(path)[:]` see fill values in unwritten rows (a concurrent reader saw them in
about 1 in 6 reads); write-then-grow never shows one. Arrays grow one after another, so only the counter makes a record consistent
across arrays: `open_metrics` reads the counter once and returns the rows below it. Rows past the
counter (a crash between data and commit) are invisible to it, and `MetricWriter.open` removes
them. `truncate` lowers the counter first, then shrinks the arrays.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import tensorstore as ts

from rareret.errors import require

RECORD_AXIS = "record"
_WIDE_RECORDS = 2**40  # leading extent of the handle that writes rows past an array's shape.
_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}},
           {"name": "zstd", "configuration": {"level": 3}}]
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class RecordSpec(NamedTuple):
    """A record array: one row of `row_shape` and `dtype` per record; `axes` name the row axes."""
    row_shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str, ...]
    attrs: Mapping[str, Any] = {}


class Coord(NamedTuple):
    """A static coordinate array, written once at creation; `axes` name its axes."""
    values: Any
    axes: tuple[str, ...]
    attrs: Mapping[str, Any] = {}


def _ts_spec(path: Path) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}


def _check_array(name: str, shape: tuple[int, ...], dtype: np.dtype, axes: tuple[str, ...]) -> None:
    require(bool(_NAME.fullmatch(name)),
            f"metric name {name!r} is not allowed; use letters, digits and underscores")
    require(dtype.kind in "biuf",
            f"metric {name!r}: dtype {dtype} is not allowed; use bool, int, uint or float")
    require(len(axes) == len(shape),
            f"metric {name!r}: axes {list(axes)} do not match its shape {shape}")
    require(len(set(axes)) == len(axes),
            f"metric {name!r}: axes {list(axes)} repeat a name; make them distinct "
            f"(e.g. task_i, task_j)")
    require(RECORD_AXIS not in axes,
            f"metric {name!r}: axis name {RECORD_AXIS!r} is reserved for the record axis")


def _create_array(path: Path, shape: tuple[int, ...], dtype: np.dtype,
                  chunk_shape: tuple[int, ...], axes: tuple[str, ...],
                  attrs: Mapping[str, Any]) -> ts.TensorStore:
    metadata = {
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunk_shape)}},
        "codecs": _CODECS,
        "dimension_names": list(axes),
        "attributes": {**attrs, "axes": list(axes)},
    }
    return ts.open({**_ts_spec(path), "metadata": metadata}, create=True,
                   dtype=ts.dtype(dtype.name), shape=list(shape)).result()


def _wide(arr: ts.TensorStore) -> ts.TensorStore:
    """A handle on `arr`'s chunks with a huge leading extent, for writing rows past its shape."""
    spec = arr.spec().to_json()
    metadata = {**spec["metadata"], "shape": [_WIDE_RECORDS, *arr.shape[1:]]}
    return ts.open({"driver": "zarr3", "kvstore": spec["kvstore"], "metadata": metadata},
                   open=True, assume_metadata=True).result()


def _leading(arr: ts.TensorStore, stop: int) -> list[int | None]:
    return [stop] + [None] * (arr.rank - 1)


def _read_group(directory: Path) -> dict:
    """The store's group attributes; ConfigError naming `directory` if it holds no store."""
    try:
        meta = json.loads((directory / "zarr.json").read_text())
    except (OSError, ValueError):
        meta = None
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    require("committed_records" in attrs and "record_arrays" in attrs,
            f"{directory} is not a metric store (no zarr group with committed_records)")
    return attrs


def _write_group(directory: Path, attrs: dict) -> None:
    """Atomically replaces the group metadata: temp file, fsync, `os.replace`."""
    tmp = directory / "zarr.json.tmp"
    with open(tmp, "w") as f:
        json.dump({"zarr_format": 3, "node_type": "group", "attributes": attrs}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "zarr.json")


def _as_rows(name: str, value: Any, arr: ts.TensorStore) -> np.ndarray:
    """`value` as k rows of `arr` (a single row gets a leading axis of 1)."""
    row_shape, dtype = tuple(arr.shape[1:]), arr.dtype.numpy_dtype
    rows = np.asarray(value)
    if rows.shape == row_shape:
        rows = rows[None]
    require(rows.shape[1:] == row_shape,
            f"metric {name!r}: got shape {rows.shape}, expected one row of shape {row_shape} "
            f"or k rows of shape (k, *{row_shape})")
    require(np.can_cast(rows.dtype, dtype, "same_kind"),
            f"metric {name!r}: dtype {rows.dtype} cannot be stored as {dtype}")
    return rows.astype(dtype, copy=False)


class MetricWriter:
    """The single writer of a metric store; build one with `create` or `open`.

    After an exception inside `append` or `truncate` the writer is unusable: reopen the store
    with `MetricWriter.open`, which rolls back anything uncommitted.
    """

    def __init__(self, directory: Path, group: dict, arrays: dict[str, ts.TensorStore]):
        self._dir = directory
        self._group = group
        self._arrays = arrays  # record arrays; each shape[0] == num_records between appends.
        self._wide = {name: _wide(arr) for name, arr in arrays.items()}

    @classmethod
    def create(cls, directory: str | os.PathLike, records: Mapping[str, RecordSpec],
               coords: Mapping[str, Coord] | None = None, *, chunk_records: int = 64,
               overwrite: bool = False) -> MetricWriter:
        """A fresh store at `directory`; replaces an existing store only if `overwrite`."""
        directory = Path(directory)
        records = {name: RecordSpec(*spec) for name, spec in records.items()}
        coords = {name: Coord(*coord) for name, coord in (coords or {}).items()}
        require(chunk_records >= 1, f"chunk_records={chunk_records} must be >= 1")
        both = sorted(set(records) & set(coords))
        require(not both, f"{directory}: metrics {both} are both records and coords")
        for name, spec in records.items():
            _check_array(name, tuple(spec.row_shape), np.dtype(spec.dtype), tuple(spec.axes))
        for name, coord in coords.items():
            values = np.asarray(coord.values)
            _check_array(name, values.shape, values.dtype, tuple(coord.axes))
        if directory.is_dir() and any(directory.iterdir()):
            _read_group(directory)  # refuses to delete a directory that is not a store.
            require(overwrite, f"{directory} already holds a metric store; pass overwrite=True")
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        group = {"committed_records": 0, "record_arrays": list(records),
                 "coord_arrays": list(coords)}
        _write_group(directory, group)
        for name, coord in coords.items():
            values = np.asarray(coord.values)
            arr = _create_array(directory / name, values.shape, values.dtype,
                                tuple(max(1, d) for d in values.shape), tuple(coord.axes),
                                coord.attrs)
            arr.write(values).result()
        arrays = {
            name: _create_array(directory / name, (0, *spec.row_shape), np.dtype(spec.dtype),
                                (chunk_records, *(max(1, d) for d in spec.row_shape)),
                                (RECORD_AXIS, *spec.axes), spec.attrs)
            for name, spec in records.items()
        }
        return cls(directory, group, arrays)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> MetricWriter:
        """Reopens a store for appending, dropping rows written after its last commit."""
        directory = Path(directory)
        group = _read_group(directory)
        n = group["committed_records"]
        arrays = {}
        for name in group["record_arrays"]:
            arr = ts.open(_ts_spec(directory / name), open=True).result()
            require(arr.shape[0] >= n, f"{directory / name} holds {arr.shape[0]} records, fewer "
                                       f"than the {n} committed: the store is corrupt")
            if arr.shape[0] > n:
                arr = arr.resize(exclusive_max=_leading(arr, n), shrink_only=True).result()
            arrays[name] = arr
        return cls(directory, group, arrays)

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def num_records(self) -> int:
        """Committed records."""
        return self._group["committed_records"]

    def append(self, rows: Mapping[str, Any]) -> None:
        """Appends and commits records: each value is one row, or k rows stacked on axis 0.

        `rows` must name every record array exactly once, all with the same number of rows.
        """
        batch = self._check(rows)
        k = len(next(iter(batch.values())))
        if k:
            self._write_rows(self.num_records, batch)
            self._commit(self.num_records + k)

    def put_coord(self, name: str, values: Any, axes: tuple[str, ...],
                  attrs: Mapping[str, Any] | None = None) -> None:
        """Writes (or replaces) a static array derived from the records, e.g. per-cycle results."""
        require(name not in self._arrays, f"put_coord: {name!r} is a record array")
        values = np.asarray(values)
        _check_array(name, values.shape, values.dtype, tuple(axes))
        path = self._dir / name
        if path.exists():
            shutil.rmtree(path)
        arr = _create_array(path, values.shape, values.dtype,
                            tuple(max(1, d) for d in values.shape), tuple(axes), attrs or {})
        arr.write(values).result()
        if name not in self._group["coord_arrays"]:
            self._group = {**self._group, "coord_arrays": [*self._group["coord_arrays"], name]}
            _write_group(self._dir, self._group)

    def truncate(self, num_records: int) -> None:
        """Rolls the store back to its first `num_records` records."""
        require(0 <= num_records <= self.num_records,
                f"truncate: num_records={num_records} is outside 0..{self.num_records}")
        self._commit(num_records)
        self._arrays = {
            name: arr.resize(exclusive_max=_leading(arr, num_records), shrink_only=True).result()
            for name, arr in self._arrays.items()
        }

    def _check(self, rows: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing, unknown = set(self._arrays) - set(rows), set(rows) - set(self._arrays)
        require(not missing and not unknown,
                f"append: missing metrics {sorted(missing)}, unknown metrics {sorted(unknown)}; "
                f"expected exactly {list(self._arrays)}")
        batch = {name: _as_rows(name, rows[name], arr) for name, arr in self._arrays.items()}
        counts = {name: len(value) for name, value in batch.items()}
        require(len(set(counts.values())) == 1,
                f"append: metrics disagree on the number of rows: {counts}")
        return batch

    def _write_rows(self, start: int, batch: dict[str, np.ndarray]) -> None:
        """Writes rows from `start` on, then grows each array to show them (no commit)."""
        stop = start + len(next(iter(batch.values())))
        writes = [self._wide[name][start:stop].write(rows) for name, rows in batch.items()]
        for write in writes:
            write.result()
        grown = {name: arr.resize(exclusive_max=_leading(arr, stop), resize_metadata_only=True,
                                  expand_only=True)
                 for name, arr in self._arrays.items()}
        self._arrays = {name: future.result() for name, future in grown.items()}

    def _commit(self, num_records: int) -> None:
        group = {**self._group, "committed_records": num_records}
        _write_group(self._dir, group)
        self._group = group


class MetricReader:
    """A read-only view of a store as of one commit; `refresh` moves it to the latest."""

    def __init__(self, directory: Path):
        self._dir = directory
        self._group = _read_group(directory)

    def refresh(self) -> int:
        """Re-reads the committed-record count and returns it."""
        self._group = _read_group(self._dir)
        return self.committed_records

    @property
    def committed_records(self) -> int:
        return self._group["committed_records"]

    def names(self) -> list[str]:
        """Record arrays, then coordinate arrays."""
        return [*self._group["record_arrays"], *self._group.get("coord_arrays", [])]

    def is_record(self, name: str) -> bool:
        """Whether `name` grows by record (rather than being a static coordinate)."""
        self._path(name)
        return name in self._group["record_arrays"]

    def read(self, name: str) -> np.ndarray:
        """A record array's committed rows, or a whole coordinate array."""
        arr = ts.open(_ts_spec(self._path(name)), open=True, read=True).result()
        if self.is_record(name):
            arr = arr[:self.committed_records]
        return arr.read().result()

    def axes(self, name: str) -> tuple[str, ...]:
        return tuple(self.attrs(name)["axes"])

    def attrs(self, name: str) -> dict[str, Any]:
        """The array's zarr attributes, `axes` included."""
        return json.loads((self._path(name) / "zarr.json").read_text()).get("attributes", {})

    def _path(self, name: str) -> Path:
        require(name in self.names(), f"{self._dir}: no metric {name!r}; have {self.names()}")
        return self._dir / name


def open_metrics(directory: str | os.PathLike) -> MetricReader:
    """Opens a metric store for reading; ConfigError naming `directory` if it holds none."""
    return MetricReader(Path(directory))

"""A run as an xarray Dataset: `open_run(workdir)` (numpy, xarray and tensorstore; no JAX).

Every array of `workdir/metrics/` becomes a variable with the dimensions its axes name. Record
arrays hold the committed records only (one read of the committed-record counter, so all of them
hold the same records, also while the run is still writing). Coordinates:

  step                          [record] training steps of each record
  width, seed, learning_rate,   [model] (synthetic) the per-model settings; gap 0 = no injection
  gap
  task                          synthetic: k = 1 … K, as in the paper and the reports (`isel`
                                takes the 0-based index); LM: the task names
  prior, frequent               [task] (synthetic) π_k and membership of the frequent set F
  kind                          [task] (LM) "cmp" or "add"
  task_i, task_j                as `task`; the LM's interference adds "text"
  layer, block, frequency       (LM) 0 = embeddings … n_layers; 0 … n_layers − 1; 1 … 50
  part, template                (LM) the gradient parts and the reference templates, by name

Static arrays that are not labels of a record axis (`spectrum` [task, direction],
`retention_gain` / `retention_decay` [cycle, model]) are data variables. Each variable keeps its
store attributes (description, ...); `ds.attrs` holds `experiment`, `workdir`,
`committed_records` and `spec` (spec.json as a dict). `to_netcdf` writes a Dataset with
attributes netCDF cannot hold (dicts, lists of names) as JSON text.
"""

from __future__ import annotations

import json
import os

import xarray as xr

from rareret import store
from rareret.analysis.phase import read_spec

TASK_DIMS = ("task", "task_i", "task_j")
NAMED_DIMS = {"part": "parts", "template": "templates"}  # dim → the attribute naming its labels.
FIRST_INDEX = {"layer": 0, "block": 0, "frequency": 1}


def open_run(workdir: str | os.PathLike) -> xr.Dataset:
    """The committed records and coordinates of the run in `workdir` (see the module docstring);
    ConfigError if it holds no run or no metric store."""
    workdir = os.fspath(workdir)
    spec = read_spec(workdir)
    metrics = store.open_metrics(os.path.join(workdir, "metrics"))
    names = metrics.names()
    variables = {name: xr.Variable(metrics.axes(name), metrics.read(name),
                                   {k: v for k, v in metrics.attrs(name).items() if k != "axes"})
                 for name in names}
    record_dims = {dim for name in names if metrics.is_record(name) for dim in metrics.axes(name)}
    is_coord = {name: name == "step" or (not metrics.is_record(name)
                                         and set(variables[name].dims) <= record_dims)
                for name in names}
    coords = {name: var for name, var in variables.items() if is_coord[name]}
    for dim in sorted(record_dims - {store.RECORD_AXIS, "model"}):
        coords[dim] = (dim, _labels(dim, variables))
    if spec.get("experiment") == "lm":
        kinds = {t.get("name"): t.get("kind") for t in (spec.get("lm") or {}).get("tasks") or ()}
        coords["kind"] = ("task", [kinds.get(name, "?") for name in coords["task"][1]])
    return xr.Dataset({name: var for name, var in variables.items() if not is_coord[name]},
                      coords=coords,
                      attrs={"experiment": spec.get("experiment"),
                             "workdir": os.path.abspath(workdir),
                             "committed_records": metrics.committed_records, "spec": spec})


def _labels(dim: str, variables: dict[str, xr.Variable]) -> list:
    """The labels of `dim`: names from an array's attributes, else numbers."""
    holder = next(var for var in variables.values() if dim in var.dims)
    size = holder.sizes[dim]
    named = holder.attrs.get("tasks") if dim in TASK_DIMS else holder.attrs.get(NAMED_DIMS.get(dim))
    if isinstance(named, list) and len(named) == size:
        return [str(name) for name in named]
    first = 1 if dim in TASK_DIMS else FIRST_INDEX.get(dim, 0)
    return list(range(first, first + size))


def to_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> None:
    """Writes `ds` as netCDF 3 (xarray's scipy engine); attributes other than numbers and text
    are stored as JSON text."""
    out = ds.copy()
    out.attrs = _netcdf_attrs(ds.attrs)
    for name, var in out.variables.items():
        var.attrs = _netcdf_attrs(ds[name].attrs)
    out.to_netcdf(path, engine="scipy")


def _netcdf_attrs(attrs: dict) -> dict:
    return {key: value if isinstance(value, (str, int, float)) and not isinstance(value, bool)
            else json.dumps(value) for key, value in attrs.items()}


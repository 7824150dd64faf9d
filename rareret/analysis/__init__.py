"""Reading runs offline, without JAX: `open_run(workdir)` (an xarray Dataset, dataset.py), the
phase comparison, retention, plots and reports."""


def __getattr__(name: str):
    if name == "open_run":  # Loaded on first use: the other modules do not need xarray.
        from rareret.analysis.dataset import open_run
        return open_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

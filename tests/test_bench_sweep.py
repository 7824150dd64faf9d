"""tools/bench_sweep.py: `--paper` runs the paper's shapes, and `--methods` picks the methods."""

import argparse
import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import bench_sweep  # noqa: E402


def gin_bindings(path: pathlib.Path) -> dict:
    """`Configurable.field = value` lines of a gin file, values as Python literals."""
    out = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition(" = ")
        if sep and "." in name and not name.startswith("#"):
            out[name.strip()] = ast.literal_eval(value.strip())
    return out


def test_paper_shapes_are_paper_phase_gin():
    gin = gin_bindings(ROOT / "gin_configs/synthetic/paper_phase.gin")
    parser = argparse.ArgumentParser()
    bench_sweep.add_shape_flags(parser)
    mixture, sweeps = bench_sweep.specs(parser.parse_args(["--paper", "--widths=2"]), [1, 4])
    for field in ("num_tasks", "task_dim", "input_dim", "beta", "alpha"):
        assert getattr(mixture, field) == gin[f"TaskMixture.{field}"], field
    for field, value in (("widths", tuple(gin["Sweep.widths"])),
                         ("batch_size", gin["Sweep.batch_size"]),
                         ("learning_rate", gin["Sweep.learning_rate"]),
                         ("warmup_steps", gin["Sweep.warmup_steps"])):
        assert getattr(sweeps[4], field) == value, field
    assert sweeps[1].seeds == (0,) and sweeps[4].seeds == (0, 1, 2, 3)


def test_methods_flag_keeps_the_table_order_and_needs_packed():
    assert bench_sweep.method_list("torch_loop,packed") == ("packed", "torch loop")
    for bad in ("jax_loop", "packed,numpy"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_sweep.method_list(bad)

"""Device meshes and the one table that maps logical axis names to mesh axes.

Model code names logical axes (`batch`, `length`, `embed`, `heads`, `kv`, `mlp`, `vocab`); this
module alone decides where they live on a mesh with axes (`data`, `fsdp`, `tensor`):

    batch → (data, fsdp)   data parallel over both; fsdp also shards the parameters'
    embed → fsdp           `embed` dimension (ZeRO-3 style), tensor parallel shards
    heads, mlp, vocab → tensor                      attention heads, MLP hidden and vocab.

Meshes use `AxisType.Auto` (GSPMD propagation), so sharded matmuls need no `out_sharding`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rareret.errors import require
from rareret.mesh_spec import MESH_AXES, MeshSpec

RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def make_mesh(spec: MeshSpec, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all, across processes)."""
    devices = jax.devices() if devices is None else devices
    shape = spec.resolve(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_sharding(logical_specs, mesh: Mesh, rules=RULES):
    """Maps a tree of logical `PartitionSpec`s to `NamedSharding`s on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(shapes, shardings) -> None:
    """ConfigError naming the first array whose dimension a mesh axis does not divide."""
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, shape), sharding in zip(flat_shapes, flat_shardings):
        for dim, entry in zip(shape.shape, sharding.spec):
            axes = entry_axes(entry)
            size = math.prod(sharding.mesh.shape[a] for a in axes)
            require(dim % size == 0,
                    f"parameter {jax.tree_util.keystr(path)} dimension {dim} is not divisible by "
                    f"mesh axes {axes} of size {size}; choose a mesh that divides the model")


def entry_axes(entry) -> tuple[str, ...]:
    """The mesh axes one `PartitionSpec` entry splits a dimension over (None: none)."""
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [B, L]: batch over (data, fsdp), sequence whole."""
    return logical_sharding(PartitionSpec("batch", "length"), mesh)

"""Device meshes and the one table that maps logical axis names to mesh axes.

Model code names logical axes (`batch`, `length`, `embed`, `heads`, `kv`, `mlp`, `vocab`); this
module alone decides where they live on a mesh with axes (`data`, `fsdp`, `tensor`):

    batch → (data, fsdp)   data parallel over both; fsdp also shards the parameters'
    embed → fsdp           `embed` dimension (ZeRO-3 style), tensor parallel shards
    heads, mlp, vocab → tensor                      attention heads, MLP hidden and vocab.

Meshes use `AxisType.Auto` (GSPMD propagation), so sharded matmuls need no `out_sharding`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rareret.errors import is_int, require

MESH_AXES = ("data", "fsdp", "tensor")
RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Mesh axis sizes; at most one may be −1 (= every device the others leave)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.astuple(self)
        for name, size in zip(MESH_AXES, sizes):
            require(is_int(size) and (size >= 1 or size == -1),
                    f"MeshSpec.{name}={size!r} must be a positive integer or -1 (auto)")
        require(sizes.count(-1) <= 1, f"MeshSpec{sizes}: at most one axis may be -1 (auto)")

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete sizes for `num_devices`; ConfigError if they do not multiply to it."""
        sizes = list(dataclasses.astuple(self))
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            require(num_devices % fixed == 0,
                    f"mesh {self._text()} cannot use {num_devices} devices: the fixed axes "
                    f"({fixed}) do not divide them")
            sizes[sizes.index(-1)] = num_devices // fixed
        require(math.prod(sizes) == num_devices,
                f"mesh {self._text()} has {math.prod(sizes)} devices; {num_devices} are available")
        return tuple(sizes)

    def _text(self) -> str:
        return "×".join(f"{n}={s}" for n, s in zip(MESH_AXES, dataclasses.astuple(self)))


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
        for dim, axes in zip(shape.shape, sharding.spec):
            axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            size = math.prod(sharding.mesh.shape[a] for a in axes)
            require(dim % size == 0,
                    f"parameter {jax.tree_util.keystr(path)} dimension {dim} is not divisible by "
                    f"mesh axes {axes} of size {size}; choose a mesh that divides the model")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches [B, L]: batch over (data, fsdp), sequence whole."""
    return logical_sharding(PartitionSpec("batch", "length"), mesh)

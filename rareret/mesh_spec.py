"""`MeshSpec`: the sizes of a device mesh's (data, fsdp, tensor) axes, validated without JAX;
`rareret.sharding` builds the mesh."""

from __future__ import annotations

import dataclasses
import math

from rareret.errors import is_int, require

MESH_AXES = ("data", "fsdp", "tensor")


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

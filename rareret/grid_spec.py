"""`Grid` (no JAX): axes over gin bindings whose product is a grid of ordinary rareret runs.

    Grid.axes = {'TaskMixture.beta': [0.5, 1.0], 'Sweep.seeds': [[0], [1]]}

Each axis is a gin binding name (`Configurable.param`, `scope/Configurable.param`) with the
values to bind; each cell of the product binds one value per axis (`Cell.bindings`), the last
axis varying fastest. A cell's directory name is its coordinates, `label=value` joined by commas
(`beta=0.5,seeds=0`): an axis's label is the shortest tail of its name's `/`- and `.`-separated
parts that no other axis shares (`beta`; `cmp.TaskSpec.seed` beside `add.TaskSpec.seed`), and a
value is written as Python prints it, strings bare and list items joined by `+` (`[0, 1]` → `0+1`,
`[]` → `empty`). Names use only letters, digits and `._+-` and differ between the values of an
axis, so they are safe on any filesystem and in any shell, and map back to one cell.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any

from rareret.errors import require

_BINDING = re.compile(r"[A-Za-z_][\w.]*(/[A-Za-z_][\w.]*)*\.[A-Za-z_]\w*")
_SAFE = re.compile(r"[A-Za-z0-9._+-]+")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid cell: its index in the product, its directory name, its coordinates
    ({label: value}) and the gin bindings that make it."""

    index: int
    name: str
    coords: dict[str, Any]
    bindings: list[str]


@dataclasses.dataclass(frozen=True)
class Grid:
    """A grid of runs (gin name `Grid`); `axes` maps gin binding names to lists of values."""

    axes: dict[str, list] | None = None

    def __post_init__(self):
        axes = self.axes
        require(isinstance(axes, dict) and axes,
                f"Grid.axes={axes!r} must map gin binding names to lists of values, e.g. "
                f"{{'TaskMixture.beta': [0.5, 1.0]}}")
        for name, values in axes.items():
            require(isinstance(name, str) and bool(_BINDING.fullmatch(name)),
                    f"Grid.axes: {name!r} is not a gin binding name like 'Sweep.seeds'")
            require(isinstance(values, (list, tuple)) and len(values) > 0,
                    f"Grid.axes[{name!r}]={values!r} must be a non-empty list of values")
            texts = [value_text(name, v) for v in values]
            twins = sorted({t for t in texts if texts.count(t) > 1})
            require(not twins, f"Grid.axes[{name!r}]: several values are written "
                               f"{', '.join(twins)}; each value must name its cells differently")

    def labels(self) -> dict[str, str]:
        """Each axis's label in cell names: the shortest unambiguous tail of its name."""
        parts = {name: re.split(r"[./]", name) for name in self.axes}
        labels = {}
        for name, own in parts.items():
            for n in range(1, len(own) + 1):
                tail = own[-n:]
                if all(other[-n:] != tail for o, other in parts.items() if o != name):
                    break
            labels[name] = ".".join(tail)
        return labels

    def cells(self) -> list[Cell]:
        """Every cell of the product of the axes, the last axis varying fastest."""
        labels = self.labels()
        cells = []
        for index, values in enumerate(itertools.product(*self.axes.values())):
            pairs = list(zip(self.axes, values))
            cells.append(Cell(
                index=index,
                name=",".join(f"{labels[n]}={value_text(n, v)}" for n, v in pairs),
                coords={labels[n]: v for n, v in pairs},
                bindings=[f"{n} = {v!r}" for n, v in pairs]))
        return cells


def value_text(axis: str, value) -> str:
    """`value` as written in a cell name; ConfigError if it is not a plain literal or its text
    would not be a safe file name."""
    require(_is_literal(value), f"Grid.axes[{axis!r}]: {value!r} is not a plain Python literal "
                                f"(number, string, bool, None or a list of them)")
    if isinstance(value, (list, tuple)):
        text = "+".join(value_text(axis, v) for v in value) or "empty"
    else:
        text = value if isinstance(value, str) else repr(value)
    require(bool(_SAFE.fullmatch(text)) and text not in (".", ".."),
            f"Grid.axes[{axis!r}]: value {value!r} cannot name a cell; values may use only "
            f"letters, digits and ._+-")
    return text


def _is_literal(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_literal(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))

"""The one exception type for bad user input (config values, data files, paths).

The CLI turns a `ConfigError` into a single line on stderr and a non-zero exit, so its
message must name the offending value and what is allowed, e.g.
``Sweep.widths: width 300 exceeds TaskMixture.input_dim=256``.
"""

import numpy as np


class ConfigError(ValueError):
    """A user-supplied value is invalid; the message says which and what is allowed."""


def require(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


GIN_CONTEXT = "\n  In "  # gin appends "\n  In call to configurable ...", "\n  In file ...".


def one_line(error: BaseException) -> str:
    """An exception's message on one line (for the one-line errors the CLI prints), without
    the context lines gin appends to errors raised in a configurable or a binding."""
    return " ".join(str(error).split(GIN_CONTEXT)[0].split())


def is_int(value) -> bool:
    """True for Python/numpy integers, False for bools (which Python counts as ints)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """True for real numbers (bools excluded)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def require_int_fields(spec, minimum: int, *names: str) -> None:
    """ConfigError unless each named field of dataclass `spec` is an integer ≥ `minimum`."""
    for name in names:
        value = getattr(spec, name)
        require(is_int(value) and value >= minimum,
                f"{type(spec).__name__}.{name}={value!r} must be an integer ≥ {minimum}")


def require_process_slice(owner: str, global_batch: int, process_index: int,
                          process_count: int) -> None:
    """ConfigError unless process `process_index` of `process_count` can take an equal share
    of `global_batch` rows."""
    require(is_int(process_count) and process_count >= 1,
            f"{owner}: process_count={process_count!r} must be an integer ≥ 1")
    require(is_int(process_index) and 0 <= process_index < process_count,
            f"{owner}: process_index={process_index!r} must be in [0, {process_count})")
    require(global_batch % process_count == 0,
            f"{owner}: global_batch={global_batch} is not divisible by "
            f"process_count={process_count}")

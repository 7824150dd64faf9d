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


def is_int(value) -> bool:
    """True for Python/numpy integers, False for bools (which Python counts as ints)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    """True for real numbers (bools excluded)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))

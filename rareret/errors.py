"""The one exception type for bad user input (config values, data files, paths).

The CLI turns a `ConfigError` into a single line on stderr and a non-zero exit, so its
message must name the offending value and what is allowed, e.g.
``Sweep.widths: width 300 exceeds TaskMixture.input_dim=256``.
"""


class ConfigError(ValueError):
    """A user-supplied value is invalid; the message says which and what is allowed."""


def require(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition` holds."""
    if not condition:
        raise ConfigError(message)

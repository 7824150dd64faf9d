"""Saving the analysis figures: one layout, resolution and cleanup for every plot."""

from __future__ import annotations


def save(fig, path: str) -> str:
    """Lays `fig` out tightly, writes it to `path` at 110 dpi, closes it; returns `path`."""
    import matplotlib.pyplot as plt  # Callers have already chosen the backend.

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

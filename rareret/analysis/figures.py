"""Saving the analysis figures: one layout, resolution and cleanup for every plot; legends of
axes that may hold no labelled line."""

from __future__ import annotations


def save(fig, path: str) -> str:
    """Lays `fig` out tightly, writes it to `path` at 110 dpi, closes it; returns `path`."""
    import matplotlib.pyplot as plt  # Callers have already chosen the backend.

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def legend(ax, **kwargs) -> None:
    """`ax.legend(**kwargs)` when `ax` holds a labelled artist: a measurement that is NaN in
    every record draws no line, and matplotlib warns about a legend of nothing."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)

"""Plots of the mechanism: rare-task retention, gradient interference, and the residual plot.

Each function reads a loaded `SyntheticRun` and writes one PNG (docs/method.md §3, §5). Models
are picked per width at the first seed and learning rate; retention plots use the largest
injection gap unless said.

Shapes: see docs/method.md "Shape letters": R records, M models, K tasks.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rareret.analysis import figures, phase  # noqa: E402
from rareret.synthetic import theory  # noqa: E402
from rareret.synthetic.spec import rarest_task


def rare_task(run: phase.SyntheticRun) -> int:
    priors = run.mixture.prior_array()
    return run.injection.rare(run.mixture) if run.injection else rarest_task(priors)


def representative_models(run: phase.SyntheticRun, gap: int | None = None) -> dict[int, int]:
    """width → index of its first model (first seed and rate) on stream `gap`, on the base
    lever (`phase.base_lever`)."""
    m = run.metrics
    widths_M, gaps_M = m.read("width"), m.read("gap")
    gap = gaps_M.max() if gap is None else gap
    base_M = phase.base_lever(run)[0]
    return {int(w): int(np.flatnonzero((widths_M == w) & (gaps_M == gap) & base_M)[0])
            for w in sorted(run.sweep.widths)}


def corrected(run: phase.SyntheticRun) -> np.ndarray:
    """s̃ for every record, model and task, [R, M, K]."""
    widths_M = run.metrics.read("width")
    return theory.corrected_alignment(run.metrics.read("alignment"), widths_M[None, :, None],
                                      run.mixture.input_dim)


def plot_rare_signal(run: phase.SyntheticRun, path: str) -> None:
    """s̃_r over training per width at the largest gap: spike-and-decay vs accumulation."""
    steps, rare = run.metrics.read("step"), corrected(run)[:, :, rare_task(run)]
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(run.sweep.widths)))
    for color, (width, m) in zip(colors, representative_models(run).items()):
        ax.plot(steps, rare[:, m], color=color, lw=1, label=f"N={width}")
    gap = int(run.metrics.read("gap").max())
    ax.set_title(f"rare task {rare_task(run) + 1}: corrected alignment s̃_r"
                 + (f" (gap G={gap})" if gap else ""))
    ax.set_xlabel("step")
    ax.set_ylabel("s̃_r")
    ax.legend(fontsize=8)
    figures.save(fig, path)


def plot_signal_vs_gap(run: phase.SyntheticRun, path: str) -> None:
    """End-of-training rare signal s̃_r and mean frequent signal s̃_F against gap, per width."""
    final = corrected(run)[-1]
    frequent_K = run.metrics.read("frequent")
    gaps = sorted(run.injection.gaps)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for width in sorted(run.sweep.widths):
        ms = [representative_models(run, g)[width] for g in gaps]
        axes[0].plot(gaps, final[ms, rare_task(run)], "o-", label=f"N={width}")
        axes[1].plot(gaps, final[ms][:, frequent_K].mean(axis=1), "o-", label=f"N={width}")
    for ax, title in zip(axes, ("rare signal s̃_r", "frequent signal (mean s̃ over F)")):
        ax.set_xscale("log")
        ax.set_xlabel("gap G")
        ax.set_title(f"end of training: {title}")
    axes[0].legend(fontsize=8)
    figures.save(fig, path)


def plot_interference(run: phase.SyntheticRun, path: str) -> None:
    """Task × task gradient cosine per width at the first and last interference records."""
    cosine = run.metrics.read("interference")
    steps = run.metrics.read("step")
    done = np.flatnonzero(~np.isnan(cosine).all(axis=(1, 2, 3)))
    records = [done[0], done[-1]] if len(done) > 1 else list(done)
    models = representative_models(run)
    fig, axes = plt.subplots(len(records), len(models), squeeze=False,
                             figsize=(2.6 * len(models), 2.6 * len(records)))
    for row, r in zip(axes, records):
        for ax, (width, m) in zip(row, models.items()):
            image = ax.imshow(cosine[r, m], cmap="RdBu_r", vmin=-1, vmax=1)
            ax.set_title(f"N={width}, step {steps[r]}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rare_frequent_cosine(run: phase.SyntheticRun, path: str) -> None:
    """Cosine between the rare-task and frequent-set gradients, and their norms, over training."""
    m = run.metrics
    cosine, norms = m.read("rare_frequent_cosine"), m.read("grad_norm")
    steps, rare, frequent_K = m.read("step"), rare_task(run), m.read("frequent")
    kept = ~np.isnan(cosine).all(axis=1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(run.sweep.widths)))
    for color, (width, i) in zip(colors, representative_models(run).items()):
        axes[0].plot(steps[kept], cosine[kept, i], color=color, label=f"N={width}")
        axes[1].semilogy(steps[kept], norms[kept][:, i][:, frequent_K].mean(axis=1), color=color,
                         label=f"N={width} frequent")
        axes[1].semilogy(steps[kept], norms[kept, i, rare], color=color, ls="--")
    axes[0].set_title("cos(g_rare, g_F)")
    axes[1].set_title("gradient norms: frequent (solid), rare (dashed)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    figures.save(fig, path)


def plot_residual(run: phase.SyntheticRun, path: str) -> None:
    """s̃_rare against δ_F over training for every width (paper Fig. 3), Prop.-6 threshold marked."""
    delta_f, rare = run.metrics.read("delta_f"), corrected(run)[:, :, rare_task(run)]
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(run.sweep.widths)))
    for color, (width, m) in zip(colors, representative_models(run).items()):
        ax.plot(np.maximum(delta_f[:, m], 1e-6), rare[:, m], ".", ms=3, color=color,
                label=f"N={width}")
    if rare_task(run) not in np.flatnonzero(run.metrics.read("frequent")):
        threshold = theory.delta_f_threshold(run.mixture, rare_task(run))
        ax.axvline(threshold, color="red", ls=":", label=f"threshold {threshold:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("δ_F (residual common-task signal)")
    ax.set_ylabel("s̃_rare")
    ax.set_title("residual plot")
    ax.legend(fontsize=7)
    figures.save(fig, path)


def retention_table(run: phase.SyntheticRun) -> list[str]:
    """Markdown rows: per width and gap, mean per-cycle gain/decay and final s̃_r."""
    gain, decay = run.metrics.read("retention_gain"), run.metrics.read("retention_decay")
    final = corrected(run)[-1, :, rare_task(run)]
    lines = ["| width | gap | mean gain | mean decay | final s̃_r |", "|---|---|---|---|---|"]
    for gap in sorted(run.injection.gaps):
        for width, m in representative_models(run, gap).items():
            lines.append(f"| {width} | {gap} | {np.nanmean(gain[:, m]):+.4f} | "
                         f"{np.nanmean(decay[:, m]):+.4f} | {final[m]:+.3f} |")
    return lines

"""`rareret-report WORKDIR`: plots and a markdown summary of a run.

Dispatches on spec.json's "experiment": a synthetic sweep gets WORKDIR/report/{phase_diagram.png,
curves.png, report.md} (this module), a language-model run the report of
`rareret.analysis.lm_report`. Reads only committed records, so it can run while the run is still
writing.

Shapes: see docs/method.md "Shape letters": R records, M models, K tasks, W grid widths.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402

from rareret.analysis import figures, lm_report, mechanism, phase  # noqa: E402
from rareret.errors import ConfigError, one_line, require  # noqa: E402


def draw_phase_diagram(ax, comp: phase.PhaseComparison, title: str):
    """Draws one phase diagram (observed normalised loss, width × task, with the staircase
    N*_k(1)) into `ax`; returns the image, for a colorbar."""
    num_tasks = comp.observed_WxK.shape[1]
    image = ax.imshow(comp.observed_WxK, origin="lower", aspect="auto", cmap="magma_r",
                      vmin=0, vmax=1, extent=(0.5, num_tasks + 0.5, -0.5, len(comp.widths) - 0.5))
    # Boundary row: the first grid width at or above the predicted critical width.
    rows = np.array([np.searchsorted(comp.widths, n) for n in comp.staircase_K]) - 0.5
    ax.step(np.arange(0.5, num_tasks + 1.5), np.append(rows, rows[-1]), where="post",
            color="cyan", lw=2, label="Theorem 3: N*_k(1)")
    ax.set_yticks(range(len(comp.widths)), [str(w) for w in comp.widths])
    ax.set_xticks(range(1, num_tasks + 1, max(1, num_tasks // 16)))
    ax.set_xlabel("task k (rarer →)")
    ax.set_ylabel("width N")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return image


def plot_phase_diagram(comparisons: dict[float, phase.PhaseComparison], path: str) -> None:
    """Observed normalised loss (width × task) per learning rate, staircase N*_k(1) overlaid."""
    fig, axes = plt.subplots(1, len(comparisons), squeeze=False,
                             figsize=(1 + 5.5 * len(comparisons), 4.2))
    for ax, (rate, comp) in zip(axes[0], comparisons.items()):
        image = draw_phase_diagram(ax, comp, f"final normalised loss, lr={rate:g}")
        fig.colorbar(image, ax=ax, label="ℓ_k / Tr C_k")
    figures.save(fig, path)


def plot_curves(run: phase.SyntheticRun, path: str) -> None:
    """Per-task normalised loss over steps, one panel per width (first seed, first rate)."""
    steps = run.metrics.read("step")
    loss_RxMxK = run.metrics.read("task_loss")
    widths_M = run.metrics.read("width")
    widths = sorted(run.sweep.widths)
    predicted_WxK = phase.theory.predicted_loss(run.mixture, widths)
    cols = min(4, len(widths))
    rows = -(-len(widths) // cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(3.6 * cols, 2.8 * rows),
                             sharex=True, sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 1, run.mixture.num_tasks))
    base_M = phase.base_lever(run)[0]
    for ax, (i, width) in zip(axes.flat, enumerate(widths)):
        m = int(np.flatnonzero((widths_M == width) & base_M)[0])
        for k in range(run.mixture.num_tasks):
            ax.plot(steps, loss_RxMxK[:, m, k], color=colors[k], lw=1)
            ax.axhline(predicted_WxK[i, k], color=colors[k], lw=0.6, ls=":")
        ax.set_title(f"N = {width}")
        ax.set_ylim(-0.02, 1.1)
    for ax in axes.flat[len(widths):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("ℓ_k / Tr C_k")
    fig.suptitle("per-task loss (colour: task, yellow = rarest); dotted: Theorem 3")
    figures.save(fig, path)


def plot_mechanism(run: phase.SyntheticRun, out: str) -> list[str]:
    """Writes the mechanism plots the run's data supports; returns markdown lines for them."""
    plots = [("residual.png", mechanism.plot_residual, "residual plot: s̃_rare vs δ_F")]
    if "interference" in run.metrics.names():
        plots += [("interference.png", mechanism.plot_interference, "gradient interference"),
                  ("rare_frequent_cosine.png", mechanism.plot_rare_frequent_cosine,
                   "rare vs frequent gradients")]
    if run.injection:
        plots += [("rare_signal.png", mechanism.plot_rare_signal, "rare signal over training"),
                  ("signal_vs_gap.png", mechanism.plot_signal_vs_gap, "signal vs gap")]
    lines = ["## Mechanism", ""]
    for name, plot, title in plots:
        plot(run, os.path.join(out, name))
        lines += [f"![{title}]({name})", ""]
    if run.injection and "retention_gain" in run.metrics.names():  # Written when the run ends.
        lines += [f"Retention of rare task {mechanism.rare_task(run) + 1} (per-cycle gain and "
                  f"decay of s̃_r, averaged over cycles):", "", *mechanism.retention_table(run), ""]
    return lines


def diverged_lines(run: phase.SyntheticRun) -> list[str]:
    """One line per model whose loss or gradient became non-finite (frozen since)."""
    m = run.metrics
    diverged_RxM, steps = m.read("diverged"), m.read("step")
    lines = []
    for model in np.flatnonzero(diverged_RxM[-1]):
        first = steps[np.argmax(diverged_RxM[:, model])]
        lines.append(f"- **diverged** model {model} (width {m.read('width')[model]}, seed "
                     f"{m.read('seed')[model]}, lr {m.read('learning_rate')[model]:g}, gap "
                     f"{m.read('gap')[model]}): non-finite by step {first}, frozen since")
    return lines + [""] if lines else lines


def markdown(run: phase.SyntheticRun, comparisons: dict[float, phase.PhaseComparison]) -> str:
    steps = run.metrics.read("step")
    lines = [
        "# rareret synthetic sweep report", "",
        f"- tasks K={run.mixture.num_tasks}, task dim d_T={run.mixture.task_dim}, "
        f"input dim D={run.mixture.input_dim}, β={run.mixture.beta}, α={run.mixture.alpha}",
        f"- widths {list(run.sweep.widths)}, seeds {list(run.sweep.seeds)}, "
        f"batch {run.sweep.batch_size}, records {run.metrics.committed_records} "
        f"(last step {int(steps[-1])} of {run.sweep.num_steps})",
        "- learned: normalised loss ≤ 1 − λ_k1/(2 Tr C_k); observed critical width = smallest "
        "grid width from which every wider model learned the task (0 = none).",
        *([f"- levers: the phase comparison, curves and mechanism plots use the base lever "
           f"only ({phase.base_lever(run)[1]}); `rareret.analysis.levers` compares the levers"]
          if phase.base_lever(run)[1] else []), "",
        *diverged_lines(run),
        "![phase diagram](phase_diagram.png)", "", "![curves](curves.png)", ""]
    for rate, comp in comparisons.items():
        errors_K = np.mean(np.abs(comp.observed_WxK - comp.predicted_WxK), axis=0)
        lines += [f"## learning rate {rate:g}", "",
                  f"Mean |observed − predicted| normalised loss over all width × task cells: "
                  f"**{comp.mean_abs_error:.4f}**; critical widths within one grid step: "
                  f"**{int(np.sum(comp.grid_steps_off() <= 1))}/{len(errors_K)}** tasks.", "",
                  "| task | prior | N*_k(1) | predicted critical width | observed critical width "
                  "| mean abs error |", "|---|---|---|---|---|---|"]
        priors = run.mixture.prior_array()
        for k in range(len(errors_K)):
            lines.append(f"| {k + 1} | {priors[k]:.4g} | {comp.staircase_K[k]} | "
                         f"{comp.predicted_critical_K[k]} | {comp.observed_critical_K[k]} | "
                         f"{errors_K[k]:.4f} |")
        lines.append("")
    return "\n".join(lines)


REPORTS = ("synthetic", "lm")  # The experiments this command reports on.


def write_report(workdir: str) -> str:
    """Writes the report files of the run in `workdir` (any experiment in `REPORTS`) and returns
    the path of report.md; ConfigError if `workdir` holds no run, or one of another experiment."""
    spec = phase.read_spec(workdir)
    experiment = spec.get("experiment")
    require(experiment in REPORTS, f"{workdir} holds a run of experiment {experiment!r}; "
                                   f"rareret-report knows {list(REPORTS)}")
    if experiment == "lm":
        return lm_report.write_report(workdir, spec)
    return write_synthetic_report(workdir)


def write_synthetic_report(workdir: str) -> str:
    """Writes a synthetic run's report files and returns the path of report.md."""
    run = phase.SyntheticRun.load(workdir)
    require(run.metrics.committed_records > 0, f"{workdir}: the run has no committed records yet")
    out = os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    rates = sorted(set(np.asarray(run.metrics.read("learning_rate")).tolist()))
    comparisons = {rate: phase.compare_with_theory(run, learning_rate=rate) for rate in rates}
    plot_phase_diagram(comparisons, os.path.join(out, "phase_diagram.png"))
    plot_curves(run, os.path.join(out, "curves.png"))
    text = markdown(run, comparisons) + "\n".join(plot_mechanism(run, out)) + "\n"
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def workdir_command(prog: str, write: Callable[[str], str]) -> Callable[[], None]:
    """The entry point of `prog WORKDIR`: prints write(WORKDIR), a bad workdir one line."""
    def main(argv: list[str]) -> None:
        if len(argv) != 2:
            raise app.UsageError(f"usage: {prog} WORKDIR")
        try:
            print(write(argv[1]))
        except ConfigError as e:
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)

    return lambda: app.run(main)


run_main = workdir_command("rareret-report", write_report)


if __name__ == "__main__":
    run_main()

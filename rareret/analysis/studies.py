"""The paper's figures as studies: what each runs, what the paper reports, and a verdict on what a
run here shows (experiments/README.md is the map; `rareret-experiments` runs them).

A `Study` names its runs (`Job`s: one `rareret` run or one `rareret-grid` grid, each with a gin
file under experiments/<study>/, at CPU scale and at the paper's scale) and an `observe` function
that reads the finished runs (plain numpy, no JAX) and returns an `Observation`: the numbers
measured, a verdict, and figures. Studies that read the same run name the same `Job`, so it
runs once.

Verdicts: "reproduced" (the paper's qualitative claim holds in the numbers, by the stated test),
"partly" (some of it holds), "not reproduced", or "not run" / "failed" from the runner.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rareret.analysis import (  # noqa: E402
    figures, grid_report, levers, lm_report, mechanism, phase, scaling_law)
from rareret.lm import config, ladder  # noqa: E402
from rareret.synthetic import theory  # noqa: E402

REPRODUCED, PARTLY, NOT_REPRODUCED = "reproduced", "partly", "not reproduced"


@dataclasses.dataclass(frozen=True)
class Job:
    """One run a study reads: `rareret` (grid=False) or `rareret-grid` on experiments/<config>,
    in <root>/<name>; `None` config: nothing to run (the study computes)."""

    name: str
    config: str | None
    grid: bool = False


@dataclasses.dataclass
class Observation:
    observed: str  # The measured numbers, one line of markdown.
    verdict: str
    figures: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    figures: str  # The paper's figure / table numbers.
    title: str
    expected: str  # What the paper reports, with its numbers.
    cpu: tuple[Job, ...]
    paper: tuple[Job, ...]
    observe: Callable[[dict[str, str], str], Observation]  # ({job: dir}, output dir).


def verdict(passed: int, total: int) -> str:
    return REPRODUCED if passed == total else PARTLY if passed else NOT_REPRODUCED


def grid_cells(grid_dir: str) -> list[tuple[dict, str]]:
    """(coordinates, directory) of each cell of a grid that has records."""
    manifest = grid_report.read_manifest(grid_dir)
    cells = []
    for cell in manifest["cells"]:
        cell_dir = os.path.join(grid_dir, cell["name"])
        state = grid_report.cell_state(cell_dir)
        if state is not None and state.step is not None:
            cells.append((cell["coords"], cell_dir))
    return cells


# ----------------------------------------------------------------------------- synthetic

def _matched(comp: phase.PhaseComparison) -> tuple[int, int]:
    """(tasks whose observed critical width is the predicted grid width, tasks)."""
    return int(np.sum(comp.grid_steps_off() == 0)), len(comp.staircase_K)


def _phase_grid(jobs: dict[str, str], out: str, job: str, share: float = 0.9) -> Observation:
    """Per cell: critical widths matched and mean |obs − pred|; reproduced when every cell
    matches at least `share` of its tasks."""
    parts, good, figures = [], 0, []
    cells = grid_cells(jobs[job])
    for coords, cell_dir in cells:
        comp = phase.compare_with_theory(phase.SyntheticRun.load(cell_dir))
        matched, total = _matched(comp)
        good += matched >= share * total
        label = ", ".join(f"{k}={v}" for k, v in coords.items())
        parts.append(f"{label}: {matched}/{total} critical widths, "
                     f"mean |obs − pred| {comp.mean_abs_error:.3f}")
    path = os.path.join(out, f"{job}_phase.png")
    manifest = grid_report.read_manifest(jobs[job])
    if grid_report.plot_phase_across_beta(jobs[job], manifest, path):
        figures.append(path)
    else:
        figures.append(_phase_panels(cells, path))
    return Observation("; ".join(parts), verdict(good, len(cells)), figures)


def _phase_panels(cells: list[tuple[dict, str]], path: str) -> str:
    from rareret.analysis import report
    fig, axes = plt.subplots(1, len(cells), squeeze=False, figsize=(1 + 4.5 * len(cells), 4))
    for ax, (coords, cell_dir) in zip(axes[0], cells):
        comp = phase.compare_with_theory(phase.SyntheticRun.load(cell_dir))
        report.draw_phase_diagram(ax, comp, ", ".join(f"{k}={v}" for k, v in coords.items()))
    return figures.save(fig, path)


def observe_phase_beta(jobs, out):
    return _phase_grid(jobs, out, "phase_beta")


def observe_complexity(jobs, out):
    return _phase_grid(jobs, out, "complexity")


def observe_utility(jobs, out) -> Observation:
    """Observed final normalised loss per (width, task) against Theorem 3's, and the learned
    features in utility order."""
    run = phase.SyntheticRun.load(jobs["default"])
    comp = phase.compare_with_theory(run)
    obs, pred = comp.observed_WxK.ravel(), comp.predicted_WxK.ravel()
    r = float(np.corrcoef(obs, pred)[0, 1])
    matched, total = _matched(comp)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    widths = np.repeat(comp.widths, comp.observed_WxK.shape[1])
    scatter = left.scatter(pred, obs, c=np.log2(widths), cmap="viridis", s=12)
    left.plot([0, 1], [0, 1], "k--", lw=1)
    left.set_xlabel("Theorem 3: predicted ℓ*_k(N) / Tr C_k")
    left.set_ylabel("observed ℓ_k / Tr C_k")
    fig.colorbar(scatter, ax=left, label="log2 width")
    utilities = np.sort(theory.utilities(run.mixture).ravel())[::-1]
    right.semilogy(np.arange(1, len(utilities) + 1), utilities, ".")
    for width in comp.widths:
        right.axvline(width, color="grey", lw=0.5)
    right.set_xlabel("feature rank (vertical lines: the sweep's widths)")
    right.set_ylabel("utility u_kj = π_k λ_kj")
    figure = figures.save(fig, os.path.join(out, "utility_vs_loss.png"))
    ok = comp.mean_abs_error < 0.02 and matched == total
    return Observation(f"mean |obs − pred| {comp.mean_abs_error:.4f} over {obs.size} "
                       f"(width, task) cells, Pearson r {r:.3f}; critical widths "
                       f"{matched}/{total}", REPRODUCED if ok else PARTLY, [figure])


def observe_rank1(jobs, out) -> Observation:
    run = phase.SyntheticRun.load(jobs["rank1"])
    comp = phase.compare_with_theory(run)
    observed = comp.observed_critical_K
    exact = int(np.sum(observed == np.arange(1, len(observed) + 1)))
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(np.arange(1, len(observed) + 1), observed, "o", label="observed N_emp(k)")
    ax.plot([1, len(observed)], [1, len(observed)], "k--", lw=1, label="N_crit(k) = k")
    ax.set_xlabel("task k")
    ax.set_ylabel("critical width")
    ax.legend()
    figure = figures.save(fig, os.path.join(out, "rank1.png"))
    off = [f"k={k + 1}: {n}" for k, n in enumerate(observed) if n != k + 1]
    return Observation(f"N_emp(k) = k for {exact}/{len(observed)} tasks"
                       + (f" (off: {', '.join(off)})" if off else ""),
                       verdict(exact, len(observed)) if exact < len(observed) else REPRODUCED,
                       [figure])


def observe_long_horizon(jobs, out) -> Observation:
    """The 4× longer run learns the same tasks at the same widths as the default run."""
    short, long = (phase.compare_with_theory(phase.SyntheticRun.load(jobs[j]))
                   for j in ("default", "long_horizon"))
    same = int(np.sum(short.observed_critical_K == long.observed_critical_K))
    total = len(short.observed_critical_K)
    change = float(np.mean(np.abs(long.observed_WxK - short.observed_WxK)))
    return Observation(f"critical widths equal in {same}/{total} tasks after 4× the steps; "
                       f"mean |Δ normalised loss| {change:.4f}; mean |obs − pred| "
                       f"{short.mean_abs_error:.4f} → {long.mean_abs_error:.4f}",
                       REPRODUCED if same == total else PARTLY)


def _retention_run(jobs) -> phase.SyntheticRun:
    return phase.SyntheticRun.load(jobs["retention"])


def observe_retention(jobs, out) -> Observation:
    """Narrow widths end with s̃_r ≈ 0 at the largest gap, wide ones keep a signal, and the
    signal falls with the gap."""
    run = _retention_run(jobs)
    final = mechanism.corrected(run)[-1, :, mechanism.rare_task(run)]
    widths_M, gaps_M = run.metrics.read("width"), run.metrics.read("gap")
    gaps = sorted(set(gaps_M.tolist()))
    table = {(int(w), int(g)): float(final[(widths_M == w) & (gaps_M == g)].mean())
             for w in run.sweep.widths for g in gaps}
    widths = sorted(run.sweep.widths)
    narrow, wide = widths[0], widths[-1]
    checks = [table[narrow, gaps[-1]] < 0.05, table[wide, gaps[-1]] > 0.2,
              table[wide, gaps[0]] >= table[wide, gaps[-1]]]
    figure = os.path.join(out, "retention_rare_signal.png")
    mechanism.plot_rare_signal(run, figure)
    cells = ", ".join(f"N={w}: " + "/".join(f"{table[w, g]:.2f}" for g in gaps) for w in widths)
    return Observation(f"final s̃_r at gaps {'/'.join(map(str, gaps))}: {cells}",
                       verdict(sum(checks), len(checks)), [figure])


def observe_residual(jobs, out) -> Observation:
    """s̃_r stays near 0 while δ_F is above the Proposition-6 threshold and rises below it."""
    run = _retention_run(jobs)
    rare = mechanism.rare_task(run)
    threshold = float(theory.delta_f_threshold(run.mixture, rare))
    s_RxM = mechanism.corrected(run)[:, :, rare]
    delta_RxM = run.metrics.read("delta_f")
    above, below = s_RxM[delta_RxM > 2 * threshold], s_RxM[delta_RxM < threshold / 2]
    figure = os.path.join(out, "residual.png")
    mechanism.plot_residual(run, figure)
    checks = [above.size and np.median(above) < 0.05, below.size and np.median(below) > 0.1]
    return Observation(
        f"threshold δ_F* = {threshold:.3g}; median s̃_r {np.median(above):.3f} over "
        f"{above.size} states with δ_F > 2δ_F*, {np.median(below) if below.size else np.nan:.3f}"
        f" over {below.size} with δ_F < δ_F*/2", verdict(int(sum(map(bool, checks))), 2),
        [figure])


def observe_interference_gap(jobs, out) -> Observation:
    """The rare task's gradient conflicts more with the frequent set's in narrow encoders."""
    run = _retention_run(jobs)
    cosine_RxM = run.metrics.read("rare_frequent_cosine")
    widths_M, gaps_M = run.metrics.read("width"), run.metrics.read("gap")
    widths, gaps = sorted(run.sweep.widths), sorted(set(gaps_M.tolist()))
    second_half = slice(len(cosine_RxM) // 2, None)
    mean = {(w, g): float(np.nanmean(np.abs(cosine_RxM[second_half][:, (widths_M == w)
                                                                   & (gaps_M == g)])))
            for w in widths for g in gaps}
    fig, ax = plt.subplots(figsize=(6, 4))
    for w in widths:
        ax.plot(gaps, [mean[w, g] for g in gaps], "o-", label=f"N={w}")
    ax.set_xscale("log")
    ax.set_xlabel("injection gap G")
    ax.set_ylabel("|cos(g_rare, g_F)|, second half of training")
    ax.legend(fontsize=8)
    figure = figures.save(fig, os.path.join(out, "interference_gap.png"))
    checks = [mean[widths[0], g] > mean[widths[-1], g] for g in gaps]
    cells = ", ".join(f"N={w}: " + "/".join(f"{mean[w, g]:.3f}" for g in gaps) for w in widths)
    return Observation(f"mean |cos(g_rare, g_F)| at gaps {'/'.join(map(str, gaps))}: {cells}",
                       verdict(sum(checks), len(checks)), [figure])


def observe_scaling_law(jobs, out) -> Observation:
    """Fig. 1: the exponents the stated law gives, against the paper's N^−0.34 vs N^−α."""
    law = scaling_law.ScalingLaw()
    fit = scaling_law.exponents(law)
    figure = scaling_law.plot(law, os.path.join(out, "scaling_law.png"))
    checks = [abs(fit.compute_optimal - scaling_law.PAPER_COMPUTE_OPTIMAL_EXPONENT) < 0.03,
              fit.infinite_data > fit.compute_optimal + 0.03]
    return Observation(
        f"L0 + A/N^{law.alpha} + B/D^{law.beta}: compute-optimal reducible loss ∝ "
        f"N^−{fit.compute_optimal:.3f} (∝ C^−{fit.compute_optimal_c:.3f}), infinite-data ∝ "
        f"N^−{fit.infinite_data:.3f}; the data term is {fit.gap_fraction:.0%} of the "
        f"compute-optimal reducible loss at every N", verdict(sum(checks), len(checks)),
        [figure])


def observe_levers(jobs, out) -> Observation:
    """Beyond the paper: the exchange rate and the cheapest lever (`rareret.analysis.levers`)."""
    found = levers.study(jobs["levers"], jobs["levers_schedule"], jobs["levers_replay"], out)
    return Observation(found.observed, verdict(found.passed, found.total), found.figures)


# ----------------------------------------------------------------------------- language model

NOMINAL = {"4M": 4e6, "20M": 20e6, "300M": 300e6, "1B": 1e9, "4B": 4e9}


def observe_ladder(jobs, out) -> Observation:
    """Table 1: each rung's parameter count (OLMo's, without the input embedding) is within
    20% of its name (OLMo's own "1B" has 1.18B)."""
    counts = {name: config.param_count(ladder.config_for(name))["olmo_non_embedding"]
              for name in NOMINAL}
    close = sum(abs(counts[n] / NOMINAL[n] - 1) <= 0.2 for n in NOMINAL)
    return Observation(", ".join(f"{n}: {counts[n]:,}" for n in NOMINAL),
                       verdict(close, len(NOMINAL)))


def observe_size_frequency(jobs, out) -> Observation:
    """Fig. 5: accuracy rises with frequency at every size, and with size at the rare end."""
    grid_dir = jobs["lm_size_frequency"]
    manifest = grid_report.read_manifest(grid_dir)
    data = grid_report.size_frequency(manifest, grid_report.read_cells(grid_dir, manifest))
    sizes, freqs, tables, _ = data
    figure = os.path.join(out, "size_frequency.png")
    grid_report.plot_size_frequency(data, figure)
    parts, passed, total = [], 0, 0
    for task, (loss, accuracy) in tables.items():
        for i, size in enumerate(sizes):
            parts.append(f"{task} {size}: accuracy " + "/".join(f"{a:.2f}" for a in accuracy[i])
                         + " loss " + "/".join(f"{x:.2f}" for x in loss[i]))
            passed += bool(np.all(np.diff(loss[i]) < 0))
            total += 1
        rare = int(np.argmin(freqs))
        passed += bool(loss[-1, rare] < loss[0, rare])
        total += 1
    return Observation(f"frequencies {'/'.join(map(str, freqs))}: " + "; ".join(parts),
                       verdict(passed, total), [figure])


def _lm(jobs, job: str) -> lm_report.LmRun:
    workdir = jobs[job]
    return lm_report.LmRun(workdir, phase.read_spec(workdir))


def _task_frequencies(run: lm_report.LmRun) -> np.ndarray:
    """Each task's expected instances per batch (frequency × B·L, or 1 for every_n)."""
    tokens = run.lm["global_batch"] * run.lm["seq_len"]
    return np.array([t["frequency_per_token"] * tokens if t.get("frequency_per_token")
                     else 1.0 for t in run.task_specs])


def first_crossing(steps_R: np.ndarray, values_R: np.ndarray, level: float) -> float:
    """The first step whose value reaches `level` (NaN if none)."""
    hit = np.flatnonzero(np.nan_to_num(values_R, nan=-np.inf) >= level)
    return float(steps_R[hit[0]]) if hit.size else np.nan


LEARNED_ACCURACY = 0.6  # T_CMP is binary: 0.5 once the model answers with a label token.


def observe_order(jobs, out) -> Observation:
    """Fig. 6a: tasks of one kind are learned in order of frequency (final accuracy, and the
    first step at LEARNED_ACCURACY)."""
    run = _lm(jobs, "lm_evidence")
    steps, accuracy = run.read("step"), run.read("task_accuracy")
    names, freqs = run.tasks, _task_frequencies(run)
    cmp = run.tasks_of("cmp")
    order = sorted(cmp, key=lambda k: -freqs[k])
    reached = {k: first_crossing(steps, accuracy[:, k], LEARNED_ACCURACY) for k in cmp}
    final = accuracy[-1]
    ranks_ok = all(final[a] >= final[b] for a, b in zip(order, order[1:]))
    crossed = [reached[k] for k in order]
    crossing_ok = all(np.isnan(b) or (not np.isnan(a) and a <= b)
                      for a, b in zip(crossed, crossed[1:]))
    figure = os.path.join(out, "order_of_learning.png")
    lm_report.plot_tasks(run, figure)
    parts = [f"{names[k]} ({freqs[k]:.2g}/batch): final accuracy {final[k]:.2f}, "
             f"≥ {LEARNED_ACCURACY} at "
             f"step {'–' if np.isnan(reached[k]) else int(reached[k])}" for k in order]
    return Observation("; ".join(parts), verdict(ranks_ok + crossing_ok, 2), [figure])


def observe_every_n(jobs, out) -> Observation:
    """Fig. 6b: at equal frequency, larger gaps N give higher task loss."""
    run = _lm(jobs, "lm_every_n")
    loss = run.read("task_loss")
    gaps = [t["every_n"] for t in run.task_specs]
    order = np.argsort(gaps)
    last = lm_report.last_finite(loss)
    final = loss[last]
    rising = int(np.sum(np.diff(final[order]) > 0))
    figure = os.path.join(out, "every_n.png")
    lm_report.plot_tasks(run, figure)
    parts = [f"N={gaps[k]}: {final[k]:.3f}" for k in order]
    return Observation("final task loss " + ", ".join(parts), verdict(rising, len(gaps) - 1),
                       [figure])


def observe_representations(jobs, out) -> Observation:
    """Fig. 7: value R² of T_CMP tasks grows over training, above its null, more for frequent
    tasks; Fourier modes of a T_ADD task."""
    run = _lm(jobs, "lm_evidence")
    freqs, names = _task_frequencies(run), run.tasks
    r2, null = run.read("probe_r2"), run.read("probe_r2_null")
    probed = np.flatnonzero(np.isfinite(r2).any(axis=(1, 2)))  # Records with probes.
    first, last = probed[0], probed[-1]
    cmp = sorted(run.tasks_of("cmp"), key=lambda k: -freqs[k])
    best = {k: int(np.nanargmax(r2[last, k])) for k in cmp}
    parts = [f"{names[k]}: best-layer R² {r2[first, k, best[k]]:.2f} → {r2[last, k, best[k]]:.2f}"
             f" (layer {best[k]}; null {null[last, k, best[k]]:.2f})" for k in cmp]
    checks = [r2[last, cmp[0], best[cmp[0]]] > null[last, cmp[0], best[cmp[0]]] + 0.2,
              r2[last, cmp[0], best[cmp[0]]] > r2[first, cmp[0], best[cmp[0]]],
              r2[last, cmp[0]].max() >= r2[last, cmp[-1]].max()]
    modes = run.read("fourier_modes")
    for k in run.tasks_of("add"):
        parts.append(f"{names[k]}: Fourier modes (sum over layers) "
                     f"{np.nansum(modes[first, k]):.0f} → {np.nansum(modes[last, k]):.0f}")
    figure = os.path.join(out, "representations.png")
    lm_report.plot_representations(run, lm_report.representation_panels(run), figure)
    return Observation("; ".join(parts), verdict(sum(map(bool, checks)), len(checks)),
                       [figure])


def observe_gradients(jobs, out) -> Observation:
    """Figs. 8–9: the batch gradient aligns with the task direction at injections (through
    the task tokens), and the rest of the batch does not."""
    run = _lm(jobs, "lm_gradients")
    cosine = run.read("grad_cosine")  # [record, task, part]
    names = run.tasks
    parts, checks = [], []
    for k in range(len(names)):
        task_part = cosine[:, k, 1]
        at_injection = np.isfinite(task_part)
        if not at_injection.any():
            continue
        others = np.isfinite(cosine[:, k, 0]) & ~at_injection
        g_at = float(np.mean(cosine[at_injection, k, 0]))
        g_off = float(np.mean(cosine[others, k, 0])) if others.any() else np.nan
        nt = float(np.mean(cosine[at_injection, k, 2]))
        parts.append(f"{names[k]}: cos(g, g_r) {g_at:+.3f} at injections vs {g_off:+.3f} "
                     f"between, cos(g_t, g_r) {np.mean(task_part[at_injection]):+.3f}, "
                     f"cos(g_nt, g_r) {nt:+.3f}")
        checks += [np.mean(task_part[at_injection]) > 0, np.isnan(g_off) or g_at > g_off]
    figure = os.path.join(out, "gradient_cosines.png")
    lm_report.plot_gradients(run, list(range(len(names))), figure)
    return Observation("; ".join(parts), verdict(sum(map(bool, checks)), len(checks)),
                       [figure])


def observe_task_vs_val(jobs, out) -> Observation:
    """Figs. 22–23: held-out LM loss keeps falling while the rarest task's loss lags."""
    run = _lm(jobs, "lm_evidence")
    steps, val, loss = run.read("step"), run.read("val_loss"), run.read("task_loss")
    freqs, names = _task_frequencies(run), run.tasks
    rare, common = int(np.argmin(freqs)), int(np.argmax(freqs))
    start = np.flatnonzero(np.isfinite(loss[:, rare]))[0]
    drop = lambda x: (x[start] - x[-1]) / x[start]  # noqa: E731
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, val, "k", label="held-out text (val_loss)")
    for k in (common, rare):
        ax.plot(steps, loss[:, k], label=f"{names[k]} task loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    figure = figures.save(fig, os.path.join(out, "task_vs_val.png"))
    checks = [drop(val) > 0, drop(loss[:, common]) > drop(loss[:, rare])]
    return Observation(f"from step {int(steps[start])}: val_loss {val[start]:.3f} → "
                       f"{val[-1]:.3f}; {names[common]} {loss[start, common]:.3f} → "
                       f"{loss[-1, common]:.3f}; {names[rare]} {loss[start, rare]:.3f} → "
                       f"{loss[-1, rare]:.3f}", verdict(sum(map(bool, checks)), 2), [figure])


# ----------------------------------------------------------------------------- registry

def _jobs(*entries) -> tuple[Job, ...]:
    return tuple(Job(name, config, grid) for name, config, grid in entries)


DEFAULT = ("default", "utility_vs_loss/cpu.gin", False)
RETENTION = ("retention", "retention/cpu.gin", False)
LM_EVIDENCE = ("lm_evidence", "lm_order/cpu.gin", False)
LM_EVERY_N = ("lm_every_n", "lm_every_n/cpu.gin", False)
LEVERS = (("", ""), ("_schedule", "schedule_"), ("_replay", "replay_"))  # (job, config) suffixes.

STUDIES = (
    Study("phase_diagram", "Figs. 2a, 13, 17", "toy phase diagram per β",
          "the boundary between learned and unlearned tasks follows the Theorem-3 staircase "
          "N*_k(1) for every β ∈ {0.5, 1, 1.5, 2}",
          _jobs(("phase_beta", "phase_diagram/cpu.gin", True)),
          _jobs(("phase_beta", "phase_diagram/paper.gin", True)), observe_phase_beta),
    Study("utility_vs_loss", "Figs. 2b, 14", "utility vs observed loss",
          "features are learned in order of utility u_kj = π_k λ_kj: observed per-task losses "
          "follow the Theorem-3 prediction", _jobs(DEFAULT),
          _jobs(("default", "utility_vs_loss/paper.gin", False)), observe_utility),
    Study("complexity", "Figs. 15–16", "task complexity sweeps",
          "with 90%-energy directions spread over [4, 7] or [2, 12] (rarest task most complex) "
          "the staircase still predicts the boundary", _jobs(("complexity",
                                                             "complexity/cpu.gin", True)),
          _jobs(("complexity", "complexity/paper.gin", True)), observe_complexity),
    Study("rank1", "Fig. 18", "rank-1 tasks",
          "d_T = 1: N_emp(k) = k exactly (learned ⇔ s_k > 0.5)",
          _jobs(("rank1", "rank1/cpu.gin", False)), _jobs(("rank1", "rank1/paper.gin", False)),
          observe_rank1),
    Study("residual", "Figs. 3, 19", "residual common-task signal δ_F",
          "s̃_rare stays ≈ 0 until δ_F drops below ≈ 1e-2, then jumps toward 1",
          _jobs(RETENTION), _jobs(("retention", "retention/paper.gin", False)),
          observe_residual),
    Study("retention", "Figs. 4a, 20", "retention under matched-frequency injection",
          "narrow models spike at each injection and decay to ≈ 0; wide models keep and "
          "accumulate the signal; the rare signal falls with the gap G, faster when narrow",
          _jobs(RETENTION), _jobs(("retention", "retention/paper.gin", False)),
          observe_retention),
    Study("interference_gap", "Fig. 4b", "toy gradient interference vs gap",
          "the rare task's gradient interferes with the frequent tasks' more in narrow models",
          _jobs(RETENTION), _jobs(("retention", "retention/paper.gin", False)),
          observe_interference_gap),
    Study("long_horizon", "Fig. 21", "long horizon",
          "10× the steps (1M) changes nothing: the same tasks stay unlearned",
          _jobs(DEFAULT, ("long_horizon", "long_horizon/cpu.gin", False)),
          _jobs(("default", "utility_vs_loss/paper.gin", False),
                ("long_horizon", "long_horizon/paper.gin", False)), observe_long_horizon),
    Study("scaling_law", "Fig. 1", "compute-optimal vs infinite-data scaling",
          "with L(N, D) = L0 + A/N^α + B/D^β (α ≈ 0.46, β ≈ 0.51) the compute-optimal loss falls "
          "like N^−0.34 but the infinite-data loss like N^−α: part of the distribution is "
          "learnable only by model scaling", _jobs(("scaling_law", None, False)),
          _jobs(("scaling_law", None, False)), observe_scaling_law),
    Study("lm_ladder", "Table 1", "the OLMo ladder",
          "parameter counts of the 4M … 4B rungs at vocabulary 50,304",
          _jobs(("lm_ladder", None, False)), _jobs(("lm_ladder", None, False)),
          observe_ladder),
    Study("lm_size_frequency", "Fig. 5", "LM task accuracy over size × frequency",
          "rare tasks are learned only by larger models at low frequency; accuracy rises with "
          "frequency", _jobs(("lm_size_frequency", "lm_size_frequency/cpu.gin", True)),
          _jobs(("lm_size_frequency", "lm_size_frequency/paper.gin", True)),
          observe_size_frequency),
    Study("lm_order", "Fig. 6a", "order of learning by frequency",
          "tasks are learned in order of frequency", _jobs(LM_EVIDENCE),
          _jobs(("lm_evidence", "lm_order/paper.gin", False)), observe_order),
    Study("lm_every_n", "Fig. 6b", "N instances every N batches",
          "at equal frequency, larger gaps N give higher task loss", _jobs(LM_EVERY_N),
          _jobs(("lm_every_n", "lm_every_n/paper.gin", False)), observe_every_n),
    Study("lm_representations", "Fig. 7", "representations over training",
          "features appear earlier and stronger with size and frequency (T_CMP value R², T_ADD "
          "Fourier modes)", _jobs(LM_EVIDENCE),
          _jobs(("lm_evidence", "lm_order/paper.gin", False)), observe_representations),
    Study("lm_gradients", "Figs. 8–9", "LM gradient cosines around injections",
          "cos(g, g_r) at injection 0.08 ± 0.02 (1B), 0.04 ± 0.04 (300M); cos(g_nt, g_r) "
          "0.10 ± 0.09 (20M) vs ≈ 0 (1B)", _jobs(("lm_gradients", "lm_gradients/cpu.gin", False)),
          _jobs(("lm_gradients", "lm_gradients/paper.gin", False)), observe_gradients),
    Study("lm_task_vs_val", "Figs. 22–23", "task loss vs held-out loss",
          "the held-out LM loss keeps improving while rare tasks' losses lag",
          _jobs(LM_EVIDENCE), _jobs(("lm_evidence", "lm_order/paper.gin", False)),
          observe_task_vs_val),
    Study("levers", "beyond the paper", "the price of learning a rare task",
          "(not measured in the paper) width buys rare tasks, and showing the rare task more "
          "often is suggested to be cheaper; here: the width–frequency exchange rate against "
          "Proposition 6, and FLOPs to learn by width, frequency, update rule, spacing, replay",
          _jobs(*((f"levers{s}", f"levers/{c}cpu.gin", False) for s, c in LEVERS)),
          _jobs(*((f"levers{s}", f"levers/{c}paper.gin", False) for s, c in LEVERS)),
          observe_levers),
)

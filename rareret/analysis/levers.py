"""The price of learning a rare task: width vs frequency vs update rule vs spacing and replay
(experiments/levers, docs/method.md §5.4). Numpy only.

A model has learned the rare task r once its normalised loss is at or below
`phase.learned_threshold` (docs/method.md §3.1). From that:

- the exchange rate: the smallest width that learns r at each rare multiplier m, and the
  smallest m at each width (each "from which every larger value learns", as critical widths
  are), next to Proposition 6 / Theorem 3 at the multiplied prior (`theory.critical_width`,
  `theory.staircase` with `spec.multiplied_priors`);
- the compute to learn it: FLOPs per step (`flops_per_step`) × the first record step at which
  r's loss is at the threshold (NaN if never);
- the cheapest lever at each width.

Shapes: see docs/method.md "Shape letters": R records, M models, W grid widths, U multipliers
(a letter local to this module).
"""

from __future__ import annotations

import dataclasses
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rareret.analysis import figures, phase  # noqa: E402
from rareret.errors import ConfigError  # noqa: E402
from rareret.synthetic import theory  # noqa: E402
from rareret.synthetic.spec import UPDATE_RULES, TaskMixture, multiplied_priors  # noqa: E402

# Extra FLOPs per step of a rule's K-sized solve (the Gram and weighted sum are in
# `flops_per_step`): PCGrad's K passes over a K × K table, CAGrad's dual iterations.
RULE_SOLVE = {"adamw": lambda k: 0, "pcgrad": lambda k: 2 * k ** 3,
              "cagrad": lambda k: 200 * 4 * k ** 2}


def flops_per_step(width: int, mixture: TaskMixture, batch_size: int,
                   rule: str = "adamw") -> float:
    """One model's training FLOPs per step (computed, not measured).

    Forward and backward of the encoder (N × D) and of each example's decoder (d_T × N) over
    B examples: 6·B·(N·D + N·d_T). An aggregating rule adds the K × K Gram of the per-task
    encoder gradients (2·K²·N·D), their weighted sum (2·K·N·D) and its solve (`RULE_SOLVE`);
    the per-task gradients themselves cost what the encoder gradient does.
    """
    n, d, t, k = width, mixture.input_dim, mixture.task_dim, mixture.num_tasks
    flops = 6 * batch_size * (n * d + n * t)
    if rule != "adamw":
        flops += 2 * k * k * n * d + 2 * k * n * d + RULE_SOLVE[rule](k)
    return float(flops)


def first_learned_steps(steps_R: np.ndarray, loss_RxM: np.ndarray,
                        threshold: float) -> np.ndarray:
    """Per model, the first record step whose loss is ≤ `threshold`; NaN if none, [M]."""
    hit_RxM = np.nan_to_num(loss_RxM, nan=np.inf) <= threshold
    first_M = np.argmax(hit_RxM, axis=0)
    return np.where(hit_RxM.any(axis=0), steps_R[first_M].astype(float), np.nan)


def smallest_from_which(values, learned) -> float:
    """The smallest grid value from which every larger one learns (values ascending); NaN if
    the largest does not."""
    out = np.nan
    for value, ok in zip(values[::-1], learned[::-1]):
        if not ok:
            break
        out = float(value)
    return out


def exchange_rate(learned_WxU: np.ndarray, widths, multipliers) -> tuple[np.ndarray, np.ndarray]:
    """(smallest width learning at each multiplier [U], smallest multiplier at each width [W]),
    NaN where none does; widths and multipliers ascending."""
    by_multiplier = np.array([smallest_from_which(widths, learned_WxU[:, u])
                              for u in range(len(multipliers))])
    by_width = np.array([smallest_from_which(multipliers, learned_WxU[w])
                         for w in range(len(widths))])
    return by_multiplier, by_width


def cheapest(costs: dict[str, float | None]) -> str | None:
    """The lever with the fewest FLOPs to learn; None if none learns (NaN: never; None: not
    in the sweep)."""
    finite = {name: cost for name, cost in costs.items()
              if cost is not None and np.isfinite(cost)}
    return min(finite, key=finite.get) if finite else None


@dataclasses.dataclass
class Prediction:
    """Proposition 6 and Theorem 3 at the rare rate × multiplier."""

    proposition6: int  # N_r^crit at the multiplied prior (theory.critical_width).
    staircase: int  # N*_r(1) at the multiplied prior (theory.staircase).


def predicted(mixture: TaskMixture, rare_task: int, multiplier: float) -> Prediction:
    """The critical widths of `rare_task` when it is drawn at `multiplier` × its prior, the
    others renormalised (`spec.multiplied_priors`, as `Sweep.rare_multiplier` draws them)."""
    priors_K = multiplied_priors(mixture.prior_array(), rare_task, multiplier)
    return Prediction(theory.critical_width(mixture, rare_task, priors=priors_K),
                      int(theory.staircase(mixture, 1, priors=priors_K)[rare_task]))


def predicted_min_multiplier(mixture: TaskMixture, rare_task: int, width: int,
                             which: str = "proposition6") -> float:
    """The smallest multiplier m at which the predicted critical width (`which`: a
    `Prediction` field) is ≤ `width` (bisection to 1e-4 relative; NaN if none below
    m·π_r = 1 keeps r outside F)."""
    prior = mixture.prior_array()[rare_task]

    def learns(m):
        try:
            return getattr(predicted(mixture, rare_task, m), which) <= width
        except ConfigError:  # r has joined the frequent set: Proposition 6 no longer applies.
            return None

    if learns(1.0):
        return 1.0
    lo, hi = 1.0, (1 - 1e-9) / prior
    while learns(hi) is None:  # Back off to where r is still outside F.
        hi = (lo + hi) / 2
        if hi - lo < 1e-4 * lo:
            return np.nan
    if not learns(hi):
        return np.nan
    while hi - lo > 1e-4 * lo:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if learns(mid) else (mid, hi)
    return hi


def grid_width(widths, width: float) -> float:
    """The smallest grid width ≥ `width` (NaN past the grid)."""
    above = [w for w in sorted(widths) if w >= width]
    return float(above[0]) if above else np.nan


# ------------------------------------------------------------------------------ the study

@dataclasses.dataclass
class Found:
    observed: str  # One line of markdown.
    passed: int
    total: int
    figures: list[str]
    table: str  # The full markdown tables (levers.md).


def _models(run: phase.SyntheticRun):
    """(steps [R], rare-task loss [R, M], threshold, coordinates per model)."""
    rare = (run.injection.rare(run.mixture) if run.injection
            else int(np.flatnonzero(run.mixture.prior_array()
                                    == run.mixture.prior_array().min())[-1]))
    m = run.metrics
    coords = {"width": m.read("width"), "gap": m.read("gap"),
              "multiplier": (m.read("rare_multiplier") if run.sweep.rare_multiplier is not None
                             else np.ones(len(m.read("width")))),
              "rule": (np.array([UPDATE_RULES[i] for i in m.read("update_rule")])
                       if run.sweep.update_rules != ("adamw",)
                       else np.full(len(m.read("width")), "adamw"))}
    return rare, m.read("step"), m.read("task_loss")[:, :, rare], coords


def _cost(run, widths_M, steps_M, select_M, width, rule="adamw") -> float | None:
    chosen = np.flatnonzero(select_M & (widths_M == width))
    if not chosen.size:
        return None
    return flops_per_step(width, run.mixture, run.sweep.batch_size, rule) * steps_M[chosen[0]]


def study(main_dir: str, schedule_dir: str, replay_dir: str, out: str) -> Found:
    """The levers study on its three runs: exchange-rate table and iso-learning plot, FLOPs
    to learn per lever and width, the cheapest lever per width."""
    run = phase.SyntheticRun.load(main_dir)
    rare, steps_R, loss_RxM, c = _models(run)
    threshold = float(phase.learned_threshold(run.mixture)[rare])
    learned_M = loss_RxM[-1] <= threshold
    first_M = first_learned_steps(steps_R, loss_RxM, threshold)
    widths, multipliers = sorted(run.sweep.widths), sorted(run.sweep.rare_multipliers)
    base_rule = run.sweep.update_rules[0]

    def cell(w, u, rule=base_rule):
        chosen = (c["width"] == w) & np.isclose(c["multiplier"], u) & (c["rule"] == rule)
        return bool(learned_M[chosen].all())

    learned_WxU = np.array([[cell(w, u) for u in multipliers] for w in widths])
    width_by_U, multiplier_by_W = exchange_rate(learned_WxU, widths, multipliers)
    preds = [predicted(run.mixture, rare, u) for u in multipliers]
    min_m_W = [predicted_min_multiplier(run.mixture, rare, w) for w in widths]
    stair_m_W = [predicted_min_multiplier(run.mixture, rare, w, "staircase") for w in widths]

    # FLOPs to learn per lever and width.
    sched, replay = phase.SyntheticRun.load(schedule_dir), phase.SyntheticRun.load(replay_dir)
    _, s_steps, s_loss, s_c = _models(sched)
    _, r_steps, r_loss, r_c = _models(replay)
    s_first = first_learned_steps(s_steps, s_loss, threshold)
    r_first = first_learned_steps(r_steps, r_loss, threshold)
    gaps = sorted(sched.injection.gaps)
    plain = (c["rule"] == base_rule) & np.isclose(c["multiplier"], 1)
    levers = {}
    for w in widths:
        costs = {"base": _cost(run, c["width"], first_M, plain, w),
                 "width ×2": _cost(run, c["width"], first_M, plain, 2 * w)}
        for u in multipliers[1:]:
            costs[f"frequency ×{u:g}"] = _cost(
                run, c["width"], first_M,
                (c["rule"] == base_rule) & np.isclose(c["multiplier"], u), w)
        for rule in run.sweep.update_rules[1:]:
            costs[rule] = _cost(run, c["width"], first_M,
                                (c["rule"] == rule) & np.isclose(c["multiplier"], 1), w, rule)
        costs[f"spaced G={gaps[0]}"] = _cost(sched, s_c["width"], s_first,
                                            s_c["gap"] == gaps[0], w)
        costs[f"bunched G={gaps[-1]}"] = _cost(sched, s_c["width"], s_first,
                                              s_c["gap"] == gaps[-1], w)
        costs[f"G={replay.injection.gaps[0]} + replay k={replay.injection.replay_after}"] = (
            _cost(replay, r_c["width"], r_first, np.ones_like(r_first, bool), w))
        levers[w] = costs

    # Doubling the frequency against doubling the width, where either learns.
    duel = {w: cheapest({k: levers[w].get(k) for k in ("width ×2", "frequency ×2")})
            for w in widths}
    critical = width_by_U[multipliers.index(1)] if 1 in multipliers else np.nan
    narrow = [w for w in widths if not np.isfinite(critical) or w < critical]
    final = {(w, rule): float(np.mean(loss_RxM[-1][(c["width"] == w) & (c["rule"] == rule)
                                                    & np.isclose(c["multiplier"], 1)]))
             for w in widths for rule in run.sweep.update_rules}
    rescued = [(w, rule) for w in narrow for rule in run.sweep.update_rules[1:]
               if final[w, rule] <= threshold]

    table = _tables(run, rare, threshold, widths, multipliers, learned_WxU, width_by_U,
                    multiplier_by_W, preds, min_m_W, stair_m_W, levers, final)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "levers.md"), "w") as f:
        f.write(table)
    figures = [plot_iso_learning(widths, multipliers, learned_WxU, multiplier_by_W, min_m_W,
                                 stair_m_W, os.path.join(out, "iso_learning.png")),
               plot_costs(levers, os.path.join(out, "flops_to_learn.png"))]

    on_grid = [grid_width(widths, p.staircase) for p in preds]
    checks = [  # More frequent needs no wider; the staircase predicts it (one grid step).
        all(a >= b for a, b in zip(*[np.nan_to_num(width_by_U, nan=np.inf)[i:] for i in (0, 1)])),
        all(abs(_index(widths, o) - _index(widths, p)) <= 1 for o, p in zip(width_by_U, on_grid)),
    ]
    best = {w: cheapest({k: v for k, v in costs.items() if k != "base"})
            for w, costs in levers.items()}
    per_width = "; ".join(f"N={w}: " + (f"{b} ({levers[w][b]:.3g} FLOPs)" if b else "none")
                          for w, b in best.items())
    observed = (
        f"task {rare + 1} (π = {run.mixture.prior_array()[rare]:.3g}, learned at ℓ ≤ "
        f"{threshold:.3f}): smallest width at ×{'/'.join(f'{u:g}' for u in multipliers)} its "
        f"rate {_join(width_by_U)} (Prop. 6 {'/'.join(str(p.proposition6) for p in preds)}, "
        f"Thm 3 {'/'.join(str(p.staircase) for p in preds)}); cheapest lever: {per_width}; "
        f"doubling the width vs the frequency, cheaper: "
        + ", ".join(f"N={w} {d.split()[0]}" for w, d in duel.items() if d) + "; "
        + ("update rules at widths below the AdamW critical width: "
           + ", ".join(f"N={w} {r} ℓ={final[w, r]:.2f}" for w in narrow
                       for r in run.sweep.update_rules[1:])
           + (f" (learned: {', '.join(f'N={w} {r}' for w, r in rescued)})" if rescued
              else " (none learns)") if narrow else "no width below the critical width"))
    return Found(observed, sum(checks), len(checks), figures, table)


def _index(widths, width) -> int:
    return widths.index(int(width)) if np.isfinite(width) else len(widths)


def _join(values) -> str:
    return "/".join("–" if not np.isfinite(v) else f"{v:g}" for v in values)


def _fmt(value: float | None) -> str:
    return "–" if value is None else "never" if not np.isfinite(value) else f"{value:.3g}"


def _tables(run, rare, threshold, widths, multipliers, learned_WxU, width_by_U,
            multiplier_by_W, preds, min_m_W, stair_m_W, levers, final) -> str:
    lines = [f"# Levers: rare task {rare + 1} (π = {run.mixture.prior_array()[rare]:.4g}, "
             f"learned at normalised loss ≤ {threshold:.4f})", "",
             "## Exchange rate: smallest width per multiplier", "",
             "| multiplier | observed | Proposition 6 | Theorem 3 staircase |", "|---|---|---|---|"]
    for u, w, p in zip(multipliers, width_by_U, preds):
        lines.append(f"| {u:g} | {_join([w])} | {p.proposition6} | {p.staircase} |")
    lines += ["", "## Exchange rate: smallest multiplier per width", "",
              "| width | observed | Proposition 6 | Theorem 3 staircase | learned at ×"
              + "/".join(f"{u:g}" for u in multipliers) + " |", "|---|---|---|---|---|"]
    for i, w in enumerate(widths):
        marks = "/".join("✓" if x else "·" for x in learned_WxU[i])
        lines.append(f"| {w} | {_join([multiplier_by_W[i]])} | {min_m_W[i]:.3g} | "
                     f"{stair_m_W[i]:.3g} | {marks} |")
    names = list(next(iter(levers.values())))
    lines += ["", "## FLOPs to learn (per model: FLOPs per step × first step at the threshold)",
              "", "| width | " + " | ".join(names) + " | cheapest (not base) |",
              "|---" * (len(names) + 2) + "|"]
    for w, costs in levers.items():
        best = cheapest({k: v for k, v in costs.items() if k != "base"})
        lines.append(f"| {w} | " + " | ".join(_fmt(costs[n]) for n in names)
                     + f" | {best or 'none'} |")
    rules = run.sweep.update_rules
    lines += ["", "## Final rare-task loss at multiplier 1 per update rule", "",
              "| width | " + " | ".join(rules) + " |", "|---" * (len(rules) + 1) + "|"]
    for w in widths:
        lines.append(f"| {w} | " + " | ".join(f"{final[w, r]:.3f}" for r in rules) + " |")
    return "\n".join(lines) + "\n"


def plot_iso_learning(widths, multipliers, learned_WxU, multiplier_by_W, min_m_W, stair_m_W,
                      path: str) -> str:
    """The (width, multiplier) plane: learned cells, the observed iso-learning boundary and
    Proposition 6's / Theorem 3's."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, w in enumerate(widths):
        for j, u in enumerate(multipliers):
            ax.plot(w, u, "o", color="C0", mfc="C0" if learned_WxU[i, j] else "none")
    ax.step(widths, multiplier_by_W, where="post", color="C0", label="observed boundary")
    ax.plot(widths, min_m_W, "r--", label="Proposition 6")
    ax.plot(widths, stair_m_W, "k:", label="Theorem 3 staircase")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("width N")
    ax.set_ylabel("rare-rate multiplier m")
    ax.set_title("iso-learning curve (filled: learned)")
    ax.legend(fontsize=8)
    return figures.save(fig, path)


def plot_costs(levers: dict[int, dict[str, float]], path: str) -> str:
    """FLOPs to learn against width, one line per lever (missing: never learned)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    widths = list(levers)
    for name in next(iter(levers.values())):
        ax.plot(widths, [np.nan if levers[w][name] is None else levers[w][name]
                         for w in widths], "o-", label=name)
    ax.set_xscale("log", base=2)
    if any(cost is not None and cost > 0 for costs in levers.values()
           for cost in costs.values()):
        ax.set_yscale("log")
    ax.set_xlabel("width N")
    ax.set_ylabel("FLOPs to learn the rare task (missing: never)")
    ax.legend(fontsize=7)
    return figures.save(fig, path)

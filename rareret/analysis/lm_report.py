"""The report of a language-model run (`rareret-report WORKDIR` on a run of experiment "lm").

Writes WORKDIR/report/report.md and, next to it, losses.png and tasks.png always, and
representations.png, ablation.png, gradients.png and interference.png when the run recorded the
arrays they need. Reads `spec.json` and only committed records, with plain numpy (no JAX), so it
can run while the run is still training.

Record arrays read (rareret/lm/train.py writes them; task names in attrs["tasks"]):
  always      step, lm_loss [record]; task_loss, task_accuracy [record, task];
              val_loss [record] (plotted when present)
  optional    probe_r2, probe_r2_null [record, task, layer] (T_CMP tasks; layer 0 = embeddings);
              fourier_power [record, task, layer, frequency], fourier_modes [record, task, layer]
              (T_ADD tasks); mlp_ablation [record, task, block]; grad_cosine [record, task, part]
              (attrs["parts"]); interference [record, task_i, task_j] (injected tasks + "text").
NaN marks a record where an optional array was not measured; "final" values of the optional
arrays are those of the last record with a finite value, and the report names its step.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rareret import store  # noqa: E402
from rareret.analysis import figures  # noqa: E402
from rareret.errors import require  # noqa: E402

LEARNED_ACCURACY = 0.5  # "first step with accuracy ≥ 0.5" in the task table.
GRAD_PARTS = ("all", "task_tokens", "other_tokens")
PART_STYLES = ({"lw": 3, "alpha": 0.5, "marker": "o"}, {"ls": "--", "marker": "s"},
               {"ls": ":", "marker": "."})


class LmRun:
    """An LM run's spec (the JSON dict of `LmTrain`) and committed metrics."""

    def __init__(self, workdir: str, spec: dict):
        self.workdir = workdir
        self.lm = spec.get("lm") or {}
        self.metrics = store.open_metrics(os.path.join(workdir, "metrics"))
        require(self.metrics.committed_records > 0,
                f"{workdir}: the run has no committed records yet")
        self.names = set(self.metrics.names())
        self.steps = np.asarray(self.metrics.read("step"))
        self.tasks = self._task_names()
        by_name = {t.get("name"): t for t in self.lm.get("tasks") or [] if isinstance(t, dict)}
        self.task_specs = [by_name.get(name, {}) for name in self.tasks]
        self._cache: dict[str, np.ndarray] = {}

    def _task_names(self) -> list[str]:
        if "task_loss" in self.names:
            names = self.metrics.attrs("task_loss").get("tasks")
            if names is not None:
                return list(names)
        return [t.get("name", f"task {i}") for i, t in enumerate(self.lm.get("tasks") or [])]

    def has(self, name: str) -> bool:
        return name in self.names

    def read(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = np.asarray(self.metrics.read(name), np.float64)
        return self._cache[name]

    def kind(self, task: int) -> str:
        return self.task_specs[task].get("kind", "?")

    def tasks_of(self, kind: str) -> list[int]:
        return [k for k in range(len(self.tasks)) if self.kind(k) == kind]


# ----------------------------------------------------------------------------- numbers

def last_finite(values_RxN: np.ndarray) -> int | None:
    """Index of the last record whose row (any trailing shape) holds a finite value."""
    rows = np.isfinite(values_RxN.reshape(len(values_RxN), -1)).any(axis=1)
    found = np.flatnonzero(rows)
    return int(found[-1]) if len(found) else None


def fmt(value, digits: int = 3) -> str:
    value = float(value)
    return f"{value:.{digits}f}" if np.isfinite(value) else "–"


def schedule_text(task_spec: dict) -> str:
    if task_spec.get("every_n") is not None:
        n = task_spec["every_n"]
        return f"every_n={n} ({n} instances every {n} steps)"
    if task_spec.get("frequency_per_token") is not None:
        return f"frequency {task_spec['frequency_per_token']:g} per token"
    return "?"


def settings_lines(run: LmRun) -> list[str]:
    lm = run.lm
    records, last = run.metrics.committed_records, int(run.steps[-1])
    lines = [
        f"- model `{lm.get('model')}` (variant {lm.get('variant')}, "
        f"{lm.get('compute_dtype')}{', remat' if lm.get('remat') else ''})",
        f"- data `{lm.get('data')}`, tokenizer `{lm.get('tokenizer') or 'trained in the workdir'}`"
        f" (vocab {lm.get('vocab_size')})",
        f"- {lm.get('num_steps')} steps, batch {lm.get('global_batch')} × seq_len "
        f"{lm.get('seq_len')}, lr {lm.get('learning_rate')} (warm-up {lm.get('warmup_steps')}), "
        f"seed {lm.get('seed')}",
        f"- records: {records} committed, last step {last} of {lm.get('num_steps')} "
        f"(every {lm.get('record_every')} steps)",
    ]
    if not run.tasks:
        return lines + ["- tasks: none (plain LM run)"]
    lines.append("- tasks:")
    for name, task_spec in zip(run.tasks, run.task_specs):
        lines.append(f"  - `{name}`: {task_spec.get('kind', '?')}, {schedule_text(task_spec)}, "
                     f"seed {task_spec.get('seed', '?')}")
    return lines


def representation_cell(run: LmRun, task: int) -> str:
    """Final probe R² (best layer, with the null) for cmp; Fourier modes summed for add."""
    if run.kind(task) == "cmp" and run.has("probe_r2"):
        r2_RxL = run.read("probe_r2")[:, task]
        r = last_finite(r2_RxL)
        if r is None:
            return "R² –"
        layer = int(np.nanargmax(r2_RxL[r]))
        null = run.read("probe_r2_null")[r, task, layer] if run.has("probe_r2_null") else np.nan
        return (f"R² {fmt(r2_RxL[r, layer])} (layer {layer}; null {fmt(null)}; "
                f"step {int(run.steps[r])})")
    if run.kind(task) == "add" and run.has("fourier_modes"):
        modes_RxL = run.read("fourier_modes")[:, task]
        r = last_finite(modes_RxL)
        if r is None:
            return "modes –"
        total = float(np.nansum(modes_RxL[r]))
        return (f"{total:g} mode{'' if total == 1 else 's'} (sum over layers; "
                f"step {int(run.steps[r])})")
    return "–"


def ablation_cell(run: LmRun, task: int) -> str:
    """The block whose MLP ablation raises the task loss most, at the last ablation record."""
    if not run.has("mlp_ablation"):
        return "–"
    rise_RxN = run.read("mlp_ablation")[:, task]
    r = last_finite(rise_RxN)
    if r is None:
        return "–"
    rise_N = rise_RxN[r]
    if not np.isfinite(rise_N).any():
        return "–"
    block = int(np.nanargmax(rise_N))
    return f"block {block} (+{fmt(rise_N[block])}; step {int(run.steps[r])})"


def table_legend(run: LmRun) -> list[str]:
    legend = ["Task loss: cross-entropy of LABEL on the train instances injected so far (final: "
              "last record); accuracy: full-vocabulary argmax = LABEL on held-out test "
              "instances."]
    if run.has("probe_r2") or run.has("fourier_modes"):
        legend.append("Representation, at the last record that measured it: the largest "
                      "held-out probe R² of val(token) over layers (layer 0 = embeddings, ℓ = "
                      "after ℓ blocks) with the permuted-value null at that layer, for cmp "
                      "tasks; Fourier modes summed over layers, for add tasks.")
    if run.has("mlp_ablation"):
        legend.append("MLP ablation: the block (0-based) whose zeroed MLP output raises the task "
                      "loss most, and by how much.")
    return legend


def task_table(run: LmRun) -> list[str]:
    loss_RxK, acc_RxK = run.read("task_loss"), run.read("task_accuracy")
    header = ["task", "kind", "final task loss", "final accuracy", "best accuracy",
              f"first step accuracy ≥ {LEARNED_ACCURACY}"]
    show_repr = run.has("probe_r2") or run.has("fourier_modes")
    if show_repr:
        header.append("representation (final)")
    if run.has("mlp_ablation"):
        header.append("MLP ablation: most harmful")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k, name in enumerate(run.tasks):
        acc_R = acc_RxK[:, k]
        reached = np.flatnonzero(acc_R >= LEARNED_ACCURACY)
        best = fmt(np.nanmax(acc_R)) if np.isfinite(acc_R).any() else "–"
        cells = [f"`{name}`", run.kind(k), fmt(loss_RxK[-1, k]), fmt(acc_R[-1]), best,
                 str(int(run.steps[reached[0]])) if len(reached) else "never"]
        if show_repr:
            cells.append(representation_cell(run, k))
        if run.has("mlp_ablation"):
            cells.append(ablation_cell(run, k))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ----------------------------------------------------------------------------- figures

def _finite_line(ax, x, y, **kwargs):
    """Plots y over x skipping NaN records (the line bridges the gaps)."""
    ok = np.isfinite(y)
    if ok.any():
        ax.plot(x[ok], y[ok], **kwargs)
    return bool(ok.any())


def plot_losses(run: LmRun, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("lm_loss", "train (mean since the last record)"),
                        ("val_loss", "validation (held-out text)")):
        if run.has(name):
            _finite_line(ax, run.steps, run.read(name), marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("next-token cross-entropy")
    ax.set_title("language-model loss")
    figures.legend(ax, fontsize=8)
    figures.save(fig, path)


def plot_tasks(run: LmRun, path: str) -> None:
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_RxK, acc_RxK = run.read("task_loss"), run.read("task_accuracy")
    for k, name in enumerate(run.tasks):
        label = f"{name} ({run.kind(k)})"
        _finite_line(loss_ax, run.steps, loss_RxK[:, k], marker=".", label=label)
        _finite_line(acc_ax, run.steps, acc_RxK[:, k], marker=".", label=label)
    loss_ax.set_ylabel("cross-entropy of LABEL (injected train instances)")
    acc_ax.set_ylabel("accuracy (held-out test instances)")
    acc_ax.axhline(LEARNED_ACCURACY, color="grey", lw=0.6, ls=":")
    acc_ax.set_ylim(-0.02, 1.02)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("step")
        figures.legend(ax, fontsize=8)
    loss_ax.set_title("task loss")
    acc_ax.set_title("task accuracy")
    figures.save(fig, path)


def representation_panels(run: LmRun) -> list[tuple[int, str]]:
    """(task, array) of each task with a representation measurement somewhere."""
    panels = []
    for k in range(len(run.tasks)):
        name = {"cmp": "probe_r2", "add": "fourier_modes"}.get(run.kind(k))
        if name and run.has(name) and np.isfinite(run.read(name)[:, k]).any():
            panels.append((k, name))
    return panels


def plot_representations(run: LmRun, panels: list[tuple[int, str]], path: str) -> None:
    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(5.5 * len(panels), 4))
    for ax, (k, name) in zip(axes[0], panels):
        values_RxL = run.read(name)[:, k]
        colors = plt.cm.viridis(np.linspace(0, 0.9, values_RxL.shape[1]))
        for layer in range(values_RxL.shape[1]):
            _finite_line(ax, run.steps, values_RxL[:, layer], color=colors[layer], marker=".",
                         label=f"layer {layer}")
            if name == "probe_r2" and run.has("probe_r2_null"):
                _finite_line(ax, run.steps, run.read("probe_r2_null")[:, k, layer],
                             color=colors[layer], lw=0.7, ls=":")
        ax.set_xlabel("step")
        if name == "probe_r2":
            ax.set_ylabel("held-out R² of val(token) (dotted: permuted null)")
            ax.set_title(f"{run.tasks[k]} (cmp): linear probe of the value")
        else:
            ax.set_ylabel("Fourier modes")
            ax.set_title(f"{run.tasks[k]} (add): Fourier modes per layer")
        figures.legend(ax, fontsize=7, ncol=2)
    figures.save(fig, path)


def ablation_rise(run: LmRun) -> tuple[np.ndarray, list[int]] | None:
    """[tasks, blocks] the rise in task loss each block's MLP ablation causes (`mlp_ablation`),
    each task at its last finite record."""
    rise_RxKxN = run.read("mlp_ablation")
    rise_KxN = np.full(rise_RxKxN.shape[1:], np.nan)
    steps = []
    for k in range(rise_KxN.shape[0]):
        r = last_finite(rise_RxKxN[:, k])
        if r is not None:
            rise_KxN[k] = rise_RxKxN[r, k]
            steps.append(int(run.steps[r]))
    return (rise_KxN, steps) if np.isfinite(rise_KxN).any() else None


def plot_ablation(run: LmRun, rise_KxN: np.ndarray, path: str) -> None:
    num_tasks, num_blocks = rise_KxN.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.6 * num_blocks * max(1, num_tasks)), 4))
    width = 0.8 / max(1, num_tasks)
    for k in range(num_tasks):
        ax.bar(np.arange(num_blocks) + (k - (num_tasks - 1) / 2) * width,
               np.nan_to_num(rise_KxN[k]), width, label=f"{run.tasks[k]} ({run.kind(k)})")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(num_blocks))
    ax.set_xlabel("block whose MLP output is zeroed")
    ax.set_ylabel("rise in task loss with the MLP output zeroed")
    ax.set_title("MLP ablation (last ablation record)")
    figures.legend(ax, fontsize=8)
    figures.save(fig, path)


def plot_gradients(run: LmRun, tasks: list[int], path: str) -> None:
    cosine_RxKxP = run.read("grad_cosine")
    parts = list(run.metrics.attrs("grad_cosine").get("parts", GRAD_PARTS))
    fig, axes = plt.subplots(1, len(tasks), squeeze=False, figsize=(5.5 * len(tasks), 4),
                             sharey=True)
    for ax, k in zip(axes[0], tasks):
        for p, part in enumerate(parts):  # Styles differ: "all" ≈ "other_tokens" often.
            _finite_line(ax, run.steps, cosine_RxKxP[:, k, p], label=part,
                         **PART_STYLES[p % len(PART_STYLES)])
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel("step")
        ax.set_title(f"{run.tasks[k]}: cosine with the task gradient")
        figures.legend(ax, fontsize=8)
    axes[0, 0].set_ylabel("cosine (first-layer MLP, top neurons)")
    figures.save(fig, path)


def plot_interference(run: LmRun, r: int, path: str) -> None:
    matrix = run.read("interference")[r]
    names = list(run.metrics.attrs("interference").get("tasks", range(len(matrix))))
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(names), 1 + 0.8 * len(names)))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), [str(n) for n in names], rotation=45, ha="right")
    ax.set_yticks(range(len(names)), [str(n) for n in names])
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, fmt(matrix[i, j], 2), ha="center", va="center", fontsize=8)
    ax.set_title(f"gradient cosine, step {int(run.steps[r])}")
    fig.colorbar(image, ax=ax)
    figures.save(fig, path)


# ----------------------------------------------------------------------------- report

def write_report(workdir: str, spec: dict) -> str:
    """Writes the LM report files and returns the path of report.md."""
    run = LmRun(workdir, spec)
    out = os.path.join(workdir, "report")
    os.makedirs(out, exist_ok=True)
    lines = ["# rareret LM run report", "", *settings_lines(run), ""]

    plot_losses(run, os.path.join(out, "losses.png"))
    final = [f"final train loss {fmt(run.read('lm_loss')[-1])}"]
    if run.has("val_loss"):
        final.append(f"validation loss {fmt(run.read('val_loss')[-1])}")
    lines += ["## Language modelling", "", f"At step {int(run.steps[-1])}: {', '.join(final)}.",
              "", "![losses](losses.png)", ""]
    if not run.tasks:
        return _write(out, lines)

    plot_tasks(run, os.path.join(out, "tasks.png"))
    lines += ["## Tasks", "", " ".join(table_legend(run)), "",
              *task_table(run), "", "![tasks](tasks.png)", ""]

    panels = representation_panels(run)
    if panels:
        plot_representations(run, panels, os.path.join(out, "representations.png"))
        lines += ["## Representations", "", "![representations](representations.png)", ""]
    if run.has("mlp_ablation"):
        found = ablation_rise(run)
        if found is not None:
            plot_ablation(run, found[0], os.path.join(out, "ablation.png"))
            lines += ["## MLP ablation", "", "![MLP ablation](ablation.png)", ""]
    if run.has("grad_cosine"):
        tasks = [k for k in range(len(run.tasks))
                 if np.isfinite(run.read("grad_cosine")[:, k]).any()]
        if tasks:
            plot_gradients(run, tasks, os.path.join(out, "gradients.png"))
            lines += ["## Gradients", "", "![gradient cosines](gradients.png)", ""]
    if run.has("interference"):
        r = last_finite(run.read("interference"))
        if r is not None:
            plot_interference(run, r, os.path.join(out, "interference.png"))
            lines += ["## Gradient interference", "",
                      f"Cosines among the task gradients and the background text gradient "
                      f"(first-layer MLP, union of the tasks' top neurons) at step "
                      f"{int(run.steps[r])}.", "", "![interference](interference.png)", ""]
    return _write(out, lines)


def _write(out: str, lines: list[str]) -> str:
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path

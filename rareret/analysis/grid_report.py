"""`rareret-grid-report W`: the combined report of a grid of runs (`rareret-grid`, docs/grids.md).

Reads W/grid.json (the cells, their coordinates and directories) and each cell's committed
records (plain numpy, no JAX; safe while cells still run), and writes W/grid_report/grid.md with
a table of every cell's final metrics and, when the axes fit:

- `size_frequency.png` (an axis over `LmTrain.model` and one over a task frequency,
  `*TaskSpec.frequency_per_token` or `*TaskSpec.every_n`): the paper's Fig. 5, final loss and
  accuracy of each task over model size × frequency, averaged over the cells' other axes;
- `phase_beta.png` (an axis over `TaskMixture.beta`): one row of phase diagrams across β per
  combination of the other axes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import patheffects  # noqa: E402
import numpy as np  # noqa: E402

from rareret import store  # noqa: E402
from rareret.analysis import figures, phase, report  # noqa: E402
from rareret.errors import ConfigError, require  # noqa: E402
from rareret.grid_spec import value_text  # noqa: E402

MANIFEST = "grid.json"
REPORT_DIR = "grid_report"
FREQUENCY_AXES = ("TaskSpec.frequency_per_token", "TaskSpec.every_n")


def read_manifest(workdir: str) -> dict:
    """W/grid.json; ConfigError naming `workdir` if it holds no grid."""
    path = os.path.join(workdir, MANIFEST)
    require(os.path.isfile(path), f"{workdir} holds no rareret grid (no {MANIFEST})")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable: {e}") from e


@dataclasses.dataclass
class CellState:
    """How far a cell's run got: its experiment, last committed step and last step."""

    experiment: str
    step: int | None
    num_steps: int

    @property
    def finished(self) -> bool:
        return self.step == self.num_steps


def cell_state(cell_dir: str) -> CellState | None:
    """The state of the run in `cell_dir`, or None if it holds no run. A run is finished once
    the record of its last step is committed (Run commits every record before it returns)."""
    try:
        spec = phase.read_spec(cell_dir)
        steps = store.open_metrics(os.path.join(cell_dir, "metrics")).read("step")
    except ConfigError:
        return None
    experiment = spec.get("experiment")
    settings = spec.get({"synthetic": "sweep", "lm": "lm"}.get(experiment, "")) or {}
    return CellState(experiment, int(steps[-1]) if len(steps) else None,
                     settings.get("num_steps", -1))


def finished(cell_dir: str) -> bool:
    state = cell_state(cell_dir)
    return state is not None and state.finished


# ----------------------------------------------------------------------------- final metrics

def synthetic_metrics(cell_dir: str) -> dict[str, float]:
    """A sweep's final numbers: mean normalised task loss (all models and tasks), the tasks the
    widest width learned, the mean |observed − predicted| loss and the tasks whose critical width
    matches the theory's (first learning rate)."""
    run = phase.SyntheticRun.load(cell_dir)
    comp = phase.compare_with_theory(run)
    learned = comp.observed_WxK[-1] <= phase.learned_threshold(run.mixture)
    return {"mean task loss": float(np.mean(run.final("task_loss"))),
            "tasks learned (widest)": int(learned.sum()),
            "theory error": comp.mean_abs_error,
            "critical widths matched": int(np.sum(comp.grid_steps_off() == 0))}


def lm_metrics(cell_dir: str) -> dict[str, float]:
    """An LM run's final train and validation loss, and each task's loss and accuracy."""
    metrics = store.open_metrics(os.path.join(cell_dir, "metrics"))
    out = {name: float(metrics.read(name)[-1]) for name in ("lm_loss", "val_loss")
           if name in metrics.names()}
    tasks = metrics.attrs("task_loss").get("tasks", [])
    for k, task in enumerate(tasks):
        out[f"loss[{task}]"] = float(metrics.read("task_loss")[-1, k])
        out[f"accuracy[{task}]"] = float(metrics.read("task_accuracy")[-1, k])
    return out


METRICS = {"synthetic": synthetic_metrics, "lm": lm_metrics}


@dataclasses.dataclass
class CellResult:
    name: str
    coords: dict
    status: str
    metrics: dict[str, float]


def read_cells(workdir: str, manifest: dict) -> list[CellResult]:
    """Every cell of the manifest with its status and final metrics (none if no records)."""
    results = []
    for cell in manifest["cells"]:
        cell_dir = os.path.join(workdir, cell["name"])
        state = cell_state(cell_dir)
        if state is None or state.step is None:
            status, metrics = "not started", {}
        else:
            status = ("finished" if state.finished
                      else f"step {state.step} of {state.num_steps}")
            metrics = METRICS.get(state.experiment, lambda _: {})(cell_dir)
        results.append(CellResult(cell["name"], cell["coords"], status, metrics))
    return results


# ----------------------------------------------------------------------------- figures

def axis_label(manifest: dict, suffixes) -> str | None:
    """The label of the first axis whose binding name ends with one of `suffixes`."""
    for name, label in manifest["labels"].items():
        if any(name == s or name.endswith(("." + s, "/" + s)) for s in suffixes):
            return label
    return None


def axis_values(manifest: dict, label: str) -> list:
    name = next(n for n, lab in manifest["labels"].items() if lab == label)
    return manifest["axes"][name]


def size_frequency(manifest: dict, cells: list[CellResult]):
    """Fig. 5's numbers, or None if the axes do not fit: (sizes, frequencies,
    {task: (loss [size, frequency], accuracy [size, frequency])}, (size label, frequency
    label)), each entry the mean over the cells of that size and frequency that have records
    (NaN if none)."""
    size, freq = axis_label(manifest, ["LmTrain.model"]), axis_label(manifest, FREQUENCY_AXES)
    if size is None or freq is None:
        return None
    sizes, freqs = axis_values(manifest, size), axis_values(manifest, freq)
    tasks = list(dict.fromkeys(key[len("loss["):-1] for c in cells for key in c.metrics
                               if key.startswith("loss[")))
    tables = {}
    for task in tasks:
        values = {}
        for metric in ("loss", "accuracy"):
            table = np.full((len(sizes), len(freqs)), np.nan)
            for i, j in itertools.product(range(len(sizes)), range(len(freqs))):
                found = [c.metrics[f"{metric}[{task}]"] for c in cells
                         if c.coords[size] == sizes[i] and c.coords[freq] == freqs[j]
                         and f"{metric}[{task}]" in c.metrics]
                if found:
                    table[i, j] = np.mean(found)
            values[metric] = table
        tables[task] = (values["loss"], values["accuracy"])
    return sizes, freqs, tables, (size, freq)


def plot_size_frequency(data, path: str) -> None:
    sizes, freqs, tables, (size, freq) = data
    fig, axes = plt.subplots(2, len(tables), squeeze=False,
                             figsize=(1.5 + 4 * len(tables), 6.5))
    for col, (task, pair) in enumerate(tables.items()):
        for row, (table, what, cmap) in enumerate(zip(pair, ("final task loss", "accuracy"),
                                                      ("magma_r", "viridis"))):
            ax = axes[row, col]
            image = ax.imshow(table, origin="lower", aspect="auto", cmap=cmap,
                              **({"vmin": 0, "vmax": 1} if row else {}))
            for i, j in itertools.product(range(len(sizes)), range(len(freqs))):
                ax.text(j, i, f"{table[i, j]:.2f}", ha="center", va="center", fontsize=9,
                        color="white", path_effects=[patheffects.withStroke(linewidth=2,
                                                                             foreground="black")])
            ax.set_xticks(range(len(freqs)), [str(f) for f in freqs])
            ax.set_yticks(range(len(sizes)), [str(s) for s in sizes])
            ax.set_xlabel(freq)
            ax.set_ylabel(size)
            ax.set_title(f"{task}: {what}")
            fig.colorbar(image, ax=ax)
    figures.save(fig, path)


def plot_phase_across_beta(workdir: str, manifest: dict, path: str) -> bool:
    """One row of phase diagrams across β per combination of the other axes' values; False
    if the grid has no β axis or no synthetic cell with records."""
    beta = axis_label(manifest, ["TaskMixture.beta"])
    if beta is None:
        return False
    panels = {}  # (the other coordinates, β) as text → comparison
    for cell in manifest["cells"]:
        cell_dir = os.path.join(workdir, cell["name"])
        state = cell_state(cell_dir)
        if state is None or state.step is None or state.experiment != "synthetic":
            continue
        others = ", ".join(f"{k}={value_text(k, v)}" for k, v in cell["coords"].items()
                           if k != beta)
        panels[others, value_text(beta, cell["coords"][beta])] = phase.compare_with_theory(
            phase.SyntheticRun.load(cell_dir))
    if not panels:
        return False
    rows = list(dict.fromkeys(others for others, _ in panels))
    betas = [value_text(beta, b) for b in axis_values(manifest, beta)]
    fig, axes = plt.subplots(len(rows), len(betas), squeeze=False, layout="constrained",
                             figsize=(1 + 4.5 * len(betas), 0.5 + 3.6 * len(rows)))
    for (r, others), (c, b) in itertools.product(enumerate(rows), enumerate(betas)):
        ax = axes[r, c]
        if (others, b) not in panels:
            ax.axis("off")
            continue
        image = report.draw_phase_diagram(ax, panels[others, b],
                                          f"{beta}={b}" + (f" ({others})" if others else ""))
    fig.colorbar(image, ax=axes, label="ℓ_k / Tr C_k")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- report

def fmt(value) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if np.isfinite(value) else "–"


def table_lines(cells: list[CellResult], labels: list[str]) -> list[str]:
    columns = list(dict.fromkeys(key for c in cells for key in c.metrics))
    lines = ["| cell | " + " | ".join([*labels, "status", *columns]) + " |",
             "|---" * (2 + len(labels) + len(columns)) + "|"]
    for c in cells:
        coords = [value_text(label, c.coords[label]) for label in labels]
        values = [fmt(c.metrics[key]) if key in c.metrics else "" for key in columns]
        lines.append(f"| `{c.name}` | " + " | ".join([*coords, c.status, *values]) + " |")
    return lines


def write_report(workdir: str) -> str:
    """Writes W/grid_report/ (grid.md and the figures the axes allow); returns grid.md's path."""
    manifest = read_manifest(workdir)
    cells = read_cells(workdir, manifest)
    out = os.path.join(workdir, REPORT_DIR)
    os.makedirs(out, exist_ok=True)
    labels = list(manifest["labels"].values())
    done = sum(c.status == "finished" for c in cells)
    lines = ["# rareret grid report", "",
             f"- {len(cells)} cells over {' × '.join(labels)}; {done} finished",
             f"- base: {' '.join(manifest['gin_files'])}"
             + "".join(f"; `{b}`" for b in manifest["gin_bindings"]), "",
             *table_lines(cells, labels), ""]
    data = size_frequency(manifest, cells)
    if data is not None:
        plot_size_frequency(data, os.path.join(out, "size_frequency.png"))
        lines += ["## Final task loss and accuracy over model size × frequency", "",
                  "![size × frequency](size_frequency.png)", ""]
    if plot_phase_across_beta(workdir, manifest, os.path.join(out, "phase_beta.png")):
        lines += ["## Phase diagrams across β", "", "![phase diagrams](phase_beta.png)", ""]
    path = os.path.join(out, "grid.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


run_main = report.workdir_command("rareret-grid-report", write_report)


if __name__ == "__main__":
    run_main()

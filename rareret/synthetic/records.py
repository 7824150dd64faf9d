"""What a sweep records: its record arrays, coordinate arrays and, for an injection schedule,
the per-cycle retention arrays written once the run ends (README "Outputs" lists them).

Interference arrays hold NaN at records whose step is not a multiple of
`Sweep.interference_every`.

Shapes: M models, K tasks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rareret import store
from rareret.analysis import retention
from rareret.synthetic import theory
from rareret.synthetic.spec import UPDATE_RULES

if TYPE_CHECKING:
    from rareret.synthetic.sweep import SweepProgram


def record_specs(program: SweepProgram) -> dict[str, store.RecordSpec]:
    M, K = program.layout.num_models, program.mixture.num_tasks
    specs = {
        "step": store.RecordSpec((), np.int64, (), {"description": "training steps taken"}),
        "train_loss": store.RecordSpec(
            (M,), np.float32, ("model",),
            {"description": "batch MSE averaged over the steps since the previous record"}),
        "task_loss": store.RecordSpec(
            (M, K), np.float32, ("model", "task"),
            {"description": "exact population loss / Tr(C_k) (1 = mean predictor)"}),
        "alignment": store.RecordSpec(
            (M, K), np.float32, ("model", "task"),
            {"description": "subspace alignment s_k = Tr(P_W C_k)/Tr(C_k)"}),
        "delta_f": store.RecordSpec(
            (M,), np.float32, ("model",),
            {"description": "residual common-task signal sum_{k in F} pi_k (1 - s_k) Tr(C_k)"}),
        "diverged": store.RecordSpec(
            (M,), bool, ("model",),
            {"description": "the model's loss or gradient became non-finite; it is frozen at "
                            "its state before that step"}),
    }
    if program.tracks_rare:
        specs["rare_rate"] = store.RecordSpec(
            (M,), np.float32, ("model",),
            {"rare_task": program.rare_task,
             "description": "fraction of the rare task's examples in the model's batches over "
                            "the steps since the previous record (NaN at step 0)"})
    if program.sweep.interference_every:
        mode = {"mode": program.sweep.interference_mode, "every": program.sweep.interference_every,
                "missing": "NaN at records whose step is not a multiple of `every`"}
        specs.update({
            "interference": store.RecordSpec(
                (M, K, K), np.float32, ("model", "task_i", "task_j"),
                {**mode, "description": "cosine between per-task encoder gradients"}),
            "interference_gram": store.RecordSpec(
                (M, K, K), np.float32, ("model", "task_i", "task_j"),
                {**mode, "description": "inner products of per-task encoder gradients"}),
            "grad_norm": store.RecordSpec(
                (M, K), np.float32, ("model", "task"),
                {**mode, "description": "norm of each task's mean-loss encoder gradient"}),
            "rare_frequent_cosine": store.RecordSpec(
                (M,), np.float32, ("model",),
                {**mode, "rare_task": program.rare_task,
                 "description": "cosine between the rare task's gradient and the prior-weighted "
                                "gradient of the frequent set F"}),
        })
    return specs


def coordinate_arrays(program: SweepProgram) -> dict[str, store.Coord]:
    mixture = program.mixture
    coords = {name: store.Coord(values, ("model",), {}) for name, values in program.model_coords.items()}
    coords["gap"] = store.Coord(program.model_coords["gap"], ("model",),
                                {"description": "injection gap G (0: i.i.d. prior, no injection)"})
    if "rare_multiplier" in coords:
        base = (program.injection.resolved_rate(mixture) if program.injection
                else float(mixture.prior_array()[program.rare_task]))
        coords["rare_multiplier"] = store.Coord(
            program.model_coords["rare_multiplier"], ("model",),
            {"rare_task": program.rare_task, "base_rate": base,
             "description": "the rare task is drawn at base_rate × this (the prior, or "
                            "Injection.rate per cycle)"})
    if "update_rule" in coords:
        coords["update_rule"] = store.Coord(
            program.model_coords["update_rule"], ("model",),
            {"values": list(UPDATE_RULES),
             "description": "index into `values`: how per-task gradients are combined"})
    return {
        **coords,
        "prior": store.Coord(mixture.prior_array().astype(np.float32), ("task",), {}),
        "spectrum": store.Coord(mixture.spectra().astype(np.float32), ("task", "direction"), {}),
        "frequent": store.Coord(program.frequent_K, ("task",),
                                {"rule": "smallest top-prior task set with cumulative prior mass "
                                         f">= {theory.FREQUENT_MASS}"}),
    }


def write_retention(writer: store.MetricWriter, program: SweepProgram) -> None:
    """Per-cycle gain and decay of the rare task's corrected alignment [cycle, model]. The gain
    is written last: readers of a run still finishing take it to mean both are there."""
    metrics = store.open_metrics(writer.directory)
    rare_RxM = retention.corrected_rare_alignment(
        metrics.read("alignment"), program.model_coords["width"], program.mixture.input_dim,
        program.rare_task)
    cycles = program.sweep.num_steps // min(program.injection.gaps)
    gain, decay = retention.gain_and_decay(metrics.read("step"), rare_RxM, program.model_coords["gap"],
                                           cycles)
    note = {"rare_task": program.rare_task, "missing": "NaN past a model's last cycle"}
    writer.put_coord("retention_decay", decay, ("cycle", "model"),
                     {**note, "description": "drop of the rare task's corrected alignment "
                                             "from after this injection to before the next"})
    writer.put_coord("retention_gain", gain, ("cycle", "model"),
                     {**note, "description": "jump of the rare task's corrected alignment at "
                                             "the cycle's injection"})

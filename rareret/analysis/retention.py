"""Per-cycle gain and decay of the rare task's corrected alignment under an injection schedule
(docs/method.md §5).

With gap G, the injection of cycle c happens in training step (c+1)·G − 1, so the states just
before and just after it are those after (c+1)·G − 1 and (c+1)·G steps. For s̃_r, the rare
task's corrected alignment (s − N/D)/(1 − N/D):

    gain_c  = s̃_r((c+1)·G) − s̃_r((c+1)·G − 1)        jump at the injection
    decay_c = s̃_r((c+1)·G) − s̃_r((c+2)·G − 1)        loss before the next one (NaN for the last)

Shapes: see docs/method.md "Shape letters": R records, M models, K tasks, Y injection cycles.
"""

from __future__ import annotations

import numpy as np

from rareret.synthetic import theory


def corrected_rare_alignment(alignment_RxMxK: np.ndarray, widths_M: np.ndarray, input_dim: int,
                             rare_task: int) -> np.ndarray:
    """s̃_r per record and model, [R, M]."""
    return theory.corrected_alignment(alignment_RxMxK[:, :, rare_task], widths_M[None, :],
                                      input_dim)


def gain_and_decay(steps_R: np.ndarray, rare_RxM: np.ndarray, gaps_M: np.ndarray,
                   num_cycles: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cycle gain and decay [Y, M] (NaN where a model has no such cycle or record)."""
    index = {int(step): r for r, step in enumerate(steps_R)}
    gain = np.full((num_cycles, len(gaps_M)), np.nan, np.float32)
    decay = np.full_like(gain, np.nan)

    def at(step, m):
        r = index.get(int(step))
        return np.nan if r is None else rare_RxM[r, m]

    for m, gap in enumerate(gaps_M):
        if gap <= 0:
            continue
        for c in range(num_cycles):
            after = (c + 1) * gap
            gain[c, m] = at(after, m) - at(after - 1, m)
            decay[c, m] = at(after, m) - at(after + gap - 1, m)
    return gain, decay

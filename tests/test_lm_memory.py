"""The LM run's host memory stays flat over many records and checkpoint saves (issue #16 item 7).

A child process trains, as the CLI does (`host_malloc.reuse_freed_memory`,
`train.schedule_for_memory`, `Run(LmProgram(...))`), a `cpu-small` model over OLMo's 50,280-token
vocabulary (so its state, 0.2 GB, stands out of the noise) with a record every step and a
checkpoint every other one, and reports its peak RSS between consecutive saves (VmHWM, reset at
each save). A save that kept a copy of the state, or records whose freed temporaries piled up,
raise each interval's peak by about that much more than the last; the test allows one state
between the median peaks of the earlier and the later saves.

`tools/bench_lm.py --memory` measures the same by phase, at the paper's rungs.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SAVES = 8
VOCAB = 50280


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(workdir: str) -> None:
    """Trains in `workdir` and prints {"state_bytes", "peaks"}: the peak RSS between saves."""
    from rareret import host_malloc

    host_malloc.reuse_freed_memory()
    from rareret.lm import train

    train.schedule_for_memory()
    import jax

    from rareret.checkpoint import Checkpoints
    from rareret.lm import inject
    from rareret.lm.spec import LmTrain
    from rareret.run import Run

    path = os.path.join(workdir, "tokens.npy")
    np.save(path, np.random.default_rng(0).integers(1, VOCAB, 200_000, dtype=np.uint16))
    spec = LmTrain(model="cpu-small", data=path, vocab_size=VOCAB, seq_len=64, global_batch=4,
                   num_steps=2 * SAVES, warmup_steps=1, record_every=1, checkpoint_every=2,
                   eval_instances=16, tasks=(inject.TaskSpec(kind="cmp", name="cmp",
                                                             frequency_per_token=1e-3),))
    peaks, save = [], Checkpoints.save

    def measured(self, *args):
        save(self, *args)
        peaks.append(_status_bytes("VmHWM"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS.

    Checkpoints.save = measured
    run = Run(train.LmProgram(spec), os.path.join(workdir, "run"), show_progress=False,
              record_delay=0)
    assert run.execute()
    state = sum(leaf.nbytes for leaf in jax.tree.leaves(run.state["model"]))
    print(json.dumps({"state_bytes": state, "peaks": peaks}))


def test_peak_rss_stays_flat_over_records_and_saves(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # One CPU device.
    proc = subprocess.run([sys.executable, __file__, "--child", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    peaks, state = np.asarray(out["peaks"]), out["state_bytes"]
    assert len(peaks) == SAVES, peaks
    # The first interval compiles the step and the measurements. A save that kept a copy of the
    # state would lift the later intervals' peaks above the earlier ones by ~3.5 states; single
    # intervals scatter by up to ~0.9 state (measured), their medians far less.
    early, late = np.median(peaks[1:SAVES // 2]), np.median(peaks[SAVES // 2:])
    assert late - early <= state, (
        f"peak RSS between saves rose by {(late - early) / 1e6:.0f} MB (median, later vs "
        f"earlier saves; state {state / 1e6:.0f} MB); peaks MB: {np.round(peaks / 1e6).tolist()}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2])

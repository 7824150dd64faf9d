"""The levers study (experiments/levers, docs/method.md §5.3–§5.4): replay shows the injected
rare rows again exactly and keeps the rare-sample budget; the exchange rate, the FLOPs to learn
and the cheapest lever computed on hand-made tables; the study at CPU scale."""

import math
import pathlib
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rareret.errors import ConfigError
from rareret.synthetic import sweep
from rareret.synthetic.spec import Injection, Sweep, TaskMixture

MIX = TaskMixture(num_tasks=5, task_dim=2, input_dim=12, beta=1.0)


def program(replay_after, rare_task=2, steps=84):
    spec = Sweep(widths=(2,), batch_size=64, num_steps=steps, record_every=steps, warmup_steps=1,
                 update_rule=("adamw", "pcgrad"))
    return sweep.SweepProgram(MIX, spec, Injection(gap=8, rare_task=rare_task, rate=0.03,
                                                   replay_after=replay_after))


@pytest.mark.parametrize("rare_task", [2, 4])
def test_replayed_rows_equal_the_injected_rows(rare_task):
    """Every injection's rare rows (x, y, task) come back exactly k steps later, on every
    stream; no other step holds a rare row."""
    k, prog = 3, program(3, rare_task)
    batches = jax.jit(jax.vmap(prog.batch))(jnp.arange(84))
    x, y, task = (np.asarray(a) for a in batches)
    injected = [t for t in range(84) if t % 8 == 7]
    for t in injected:
        for s in range(task.shape[1]):
            rows, again = task[t, s] == rare_task, task[t + k, s] == rare_task
            assert rows.sum() == again.sum() > 0
            np.testing.assert_array_equal(x[t][rows], x[t + k][again])
            np.testing.assert_array_equal(y[t, s][rows], y[t + k, s][again])
    shown = {t for t in range(84) if np.any(task[t] == rare_task)}
    assert shown == set(injected) | {t + k for t in injected}


def test_replay_keeps_the_rare_sample_budget_and_other_steps():
    """Fresh rows at half the rate, each shown twice: over n cycles and their replays exactly
    2⌊n·G·B·ρ/2⌋ rare rows, within one of the plain schedule's ⌊n·G·B·ρ⌋; steps that neither
    inject nor replay are those of the plain schedule."""
    replay, plain = program(3), program(0)
    counts = lambda p: np.asarray(jax.vmap(p.rare_counts)(jnp.arange(84)))  # noqa: E731
    n, rows = 10, 8 * 64 * Fraction("0.03")  # 10 cycles; the last replay is step 82.
    budget = 2 * math.floor(n * rows / 2)
    np.testing.assert_array_equal(counts(replay).sum(axis=0), budget)
    np.testing.assert_array_equal(counts(plain).sum(axis=0), math.floor(n * rows))
    assert budget == 152 and math.floor(n * rows) == 153
    quiet = jnp.array([t for t in range(84) if t % 8 != 7 and (t - 3) % 8 != 7])
    for a, b in zip(jax.jit(jax.vmap(replay.batch))(quiet), jax.jit(jax.vmap(plain.batch))(quiet)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("injection,text", [
    (dict(gap=(8, 16), replay_after=3), "needs one gap"),
    (dict(gap=8, replay_after=16), "is a multiple of Injection.gap=8"),
    (dict(gap=8, replay_after=-1), "replay_after=-1 must be an integer ≥ 0"),
])
def test_bad_replay_is_one_line(injection, text):
    with pytest.raises(ConfigError, match=text):
        Injection(**injection)


def test_replay_needs_one_multiplier():
    with pytest.raises(ConfigError, match="needs one Sweep.rare_multiplier"):
        sweep.SweepProgram(MIX, Sweep(widths=(2,), rare_multiplier=(1, 2), batch_size=64),
                           Injection(gap=8, rate=0.05, replay_after=3))


class FakeMetrics:
    def __init__(self, arrays):
        self.arrays = arrays

    def read(self, name):
        return self.arrays[name]


def test_phase_comparison_keeps_to_the_base_lever():
    """Models of other rare multipliers or update rules are levers, not seeds: the phase
    comparison reads only multiplier 1 and the first rule (here the 2nd and 1st listed)."""
    from rareret.analysis import phase
    widths, multipliers, rules = (2, 4), (2, 1), ("pcgrad", "adamw")
    grid = [(m, r, w) for m in multipliers for r in rules for w in widths]
    base = np.array([m == 1 and r == "pcgrad" for m, r, _ in grid])
    loss_MxK = np.where(base[:, None], 0.0, 1.0) * np.ones((len(grid), 5))
    run = phase.SyntheticRun(MIX, Sweep(widths=widths, rare_multiplier=multipliers,
                                        update_rule=rules), None, FakeMetrics({
        "width": np.array([w for *_, w in grid]), "gap": np.zeros(len(grid), int),
        "learning_rate": np.full(len(grid), 1e-3, np.float32),
        "rare_multiplier": np.array([m for m, *_ in grid], np.float32),
        "update_rule": np.array([("adamw", "pcgrad", "cagrad").index(r) for _, r, _ in grid]),
        "task_loss": loss_MxK[None]}))
    np.testing.assert_array_equal(phase.base_lever(run)[0], base)
    assert phase.base_lever(run)[1] == "rare multiplier 1, update rule pcgrad"
    np.testing.assert_array_equal(phase.compare_with_theory(run).observed_WxK, 0.0)


# --- the analysis on hand-made tables -----------------------------------------------------------

def test_exchange_rate_on_a_hand_made_table():
    """Smallest width per multiplier and smallest multiplier per width, each "from which every
    larger value learns"; NaN where none does (here multiplier 1, and width 8)."""
    from rareret.analysis import levers
    widths, multipliers = [8, 16, 32, 64], [1, 2, 4]
    learned_WxU = np.array([[0, 0, 0],
                            [0, 0, 1],
                            [0, 1, 1],
                            [1, 1, 1]], bool)
    learned_WxU[0, 1] = True  # A fluke at width 8 does not count: width 16 fails at ×2.
    learned_WxU[3, 0] = False
    by_u, by_w = levers.exchange_rate(learned_WxU, widths, multipliers)
    np.testing.assert_array_equal(by_u, [np.nan, 32, 16])
    np.testing.assert_array_equal(by_w, [np.nan, 4, 2, 2])


def test_first_learned_steps_and_the_cheapest_lever():
    from rareret.analysis import levers
    steps = np.array([0, 100, 200, 300])
    loss = np.array([[1.0, 1.0, 1.0], [0.6, np.nan, 0.9], [0.5, 0.6, 0.8], [0.4, 0.6, 0.75]])
    np.testing.assert_array_equal(levers.first_learned_steps(steps, loss, 0.6),
                                  [100, 200, np.nan])
    assert levers.cheapest({"width ×2": 3e9, "frequency ×2": 1e9, "pcgrad": np.nan}) == \
        "frequency ×2"
    assert levers.cheapest({"width ×2": None, "frequency ×2": np.nan}) is None


def test_flops_per_step():
    """6·B·(N·D + N·d_T) for the linear model; a rule adds its Gram, sum and solve."""
    from rareret.analysis import levers
    mix = TaskMixture(num_tasks=16, task_dim=8, input_dim=128)
    assert levers.flops_per_step(32, mix, 256) == 6 * 256 * (32 * 128 + 32 * 8)
    assert levers.flops_per_step(32, mix, 256, "pcgrad") == (
        6 * 256 * (32 * 128 + 32 * 8) + 2 * 16 ** 2 * 32 * 128 + 2 * 16 * 32 * 128 + 2 * 16 ** 3)


def test_predicted_exchange_rate_inverts_proposition_6():
    """At multiplier 1 the prediction is Proposition 6 / Theorem 3 unchanged; it falls as the
    rate grows; the predicted smallest multiplier at a width is where the critical width first
    reaches it."""
    from rareret.analysis import levers
    from rareret.synthetic import theory
    mix = TaskMixture(num_tasks=16, task_dim=8, input_dim=128, beta=2.0)
    base = levers.predicted(mix, 15, 1)
    assert (base.proposition6, base.staircase) == (theory.critical_width(mix, 15),
                                                   theory.staircase(mix)[15]) == (21, 42)
    assert [levers.predicted(mix, 15, m).proposition6 for m in (2, 4, 8)] == [17, 13, 9]
    for width in (8, 12, 16):
        m = levers.predicted_min_multiplier(mix, 15, width)
        assert levers.predicted(mix, 15, m).proposition6 <= width
        assert levers.predicted(mix, 15, m * (1 - 1e-3)).proposition6 > width
    assert levers.predicted_min_multiplier(mix, 15, 24) == 1.0
    assert levers.predicted_min_multiplier(mix, 15, 24, "staircase") > 1.0


# --- the study ----------------------------------------------------------------------------------

def test_the_study_reads_its_three_runs(tmp_path):
    """A few-step miniature of experiments/levers (4 tasks): the study writes its tables and
    figures and one observation line naming every lever."""
    from rareret.analysis import studies
    from rareret.run import Run
    mix = TaskMixture(num_tasks=4, task_dim=2, input_dim=16, beta=2.0)
    base = dict(widths=(2, 4), batch_size=64, num_steps=48, record_every=8, warmup_steps=4,
                learning_rate=3e-2)
    runs = {"levers": (Sweep(**base, rare_multiplier=(1, 2), update_rule=("adamw", "pcgrad")),
                       None),
            "levers_schedule": (Sweep(**base), Injection(gap=(4, 16))),
            "levers_replay": (Sweep(**base), Injection(gap=16, replay_after=8))}
    for name, (spec, injection) in runs.items():
        Run(sweep.SweepProgram(mix, spec, injection), str(tmp_path / name),
            show_progress=False).execute()
    seen = studies.observe_levers({name: str(tmp_path / name) for name in runs},
                                  str(tmp_path / "out"))
    for lever in ("width ×2", "frequency ×2", "pcgrad", "spaced G=4", "bunched G=16",
                  "G=16 + replay k=8"):
        assert lever in (tmp_path / "out" / "levers.md").read_text()
    assert "task 4 (π = 0.0439" in seen.observed and "Prop. 6" in seen.observed
    assert seen.verdict in (studies.REPRODUCED, studies.PARTLY, studies.NOT_REPRODUCED)
    assert all(pathlib.Path(f).is_file() for f in seen.figures) and len(seen.figures) == 2


@pytest.mark.slow
def test_the_full_cpu_study(tmp_path):
    """The CPU-scale study end to end (≈ 15 min on 2 cores), as `rareret-experiments` runs it."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "rareret.experiments", "--only=levers",
                             f"--root={tmp_path}"], cwd=pathlib.Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Prop. 6" in (tmp_path / "index.md").read_text()

"""Matched-frequency injection of the rare task: counts, placement, records and retention arrays."""

import math
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rareret import store
from rareret.errors import ConfigError
from rareret.run import Run
from rareret.synthetic import sweep, tasks, theory
from rareret.synthetic.spec import Injection, Sweep, TaskMixture, rarest_task

# --- counts ----------------------------------------------------------------------------------

# Dyadic rates are exact in binary, so floor(c·gap·B·rate) is well defined without rounding.
DYADIC_RATES = [1 / 4096, 5 / 2048, 3 / 64, 0.3125, 0.5, 1.0]


def exact_cumulative(gap, batch_size, rate, num_cycles):
    per_cycle = Fraction(gap) * batch_size * Fraction(rate)
    return np.array([math.floor(c * per_cycle) for c in range(1, num_cycles + 1)])


@pytest.mark.parametrize("gap", [1, 2, 3, 7, 64, 1280])
@pytest.mark.parametrize("batch_size", [1, 5, 32, 100, 512])
def test_counts_have_the_exact_long_run_frequency(gap, batch_size):
    num_cycles = 700
    checked = 0
    for rate in DYADIC_RATES:
        if gap * rate > 1:
            continue
        counts = Injection(gap=gap, rate=rate).counts(gap, batch_size, rate, num_cycles)
        assert counts.shape == (num_cycles,) and np.issubdtype(counts.dtype, np.integer)
        np.testing.assert_array_equal(np.cumsum(counts),
                                      exact_cumulative(gap, batch_size, rate, num_cycles),
                                      err_msg=f"gap={gap} B={batch_size} rate={rate}")
        assert np.all(counts >= 0) and np.all(counts <= batch_size)
        # m_c takes the floor and ceiling of gap·B·rate only.
        per_cycle = gap * batch_size * rate
        assert set(counts.tolist()) <= {math.floor(per_cycle), math.ceil(per_cycle)}
        checked += 1
    assert checked >= 1


def test_counts_include_non_integer_per_cycle_amounts():
    # 3·5·(3/64) = 45/64 < 1 per cycle: 45 of every 64 cycles inject one example, the rest none.
    counts = Injection(gap=3, rate=3 / 64).counts(3, 5, 3 / 64, 64)
    assert counts.sum() == 45 and set(counts.tolist()) == {0, 1}
    injecting = [c - 1 for c in range(1, 65) if (c * 45) // 64 > ((c - 1) * 45) // 64]
    np.testing.assert_array_equal(np.flatnonzero(counts), injecting)


@pytest.mark.parametrize("gap, batch_size, rate", [
    (1024, 512, 6e-4), (256, 512, 0.0006103515625), (3, 100, 0.29), (1, 1000, 1 / 3),
    (7, 33, 0.1), (64, 1024, 0.013)])
def test_decimal_rates_stay_within_one_example(gap, batch_size, rate):
    counts = Injection(gap=gap, rate=rate).counts(gap, batch_size, rate, 3000)
    exact = exact_cumulative(gap, batch_size, Fraction(str(rate)), 3000)
    assert np.max(np.abs(np.cumsum(counts) - exact)) <= 1
    assert np.all(counts <= batch_size) and np.all(counts >= 0)


def test_decimal_rate_with_integer_cycle_amount_is_exact():
    counts = Injection(gap=1, rate=0.29).counts(1, 100, 0.29, 10)
    np.testing.assert_array_equal(counts, 29)


def test_counts_of_no_cycles_is_empty():
    assert Injection(gap=4).counts(4, 32, 0.1, 0).shape == (0,)


# --- placement in the data streams -----------------------------------------------------------

MIX = TaskMixture(num_tasks=5, task_dim=1, input_dim=6, beta=1.0)
GAPS = (2, 3, 5)
RATE = 0.05  # gap·B·rate = 6.4, 9.6, 16 at B = 64.


def program_for(batch_size=64, num_steps=31, gaps=GAPS, rate=RATE, data_seed=0, **kwargs):
    spec = Sweep(widths=(1,), batch_size=batch_size, num_steps=num_steps,
                       record_every=num_steps, warmup_steps=1, data_seed=data_seed)
    return sweep.SweepProgram(MIX, spec, Injection(gap=gaps, rate=rate, **kwargs))


def batches(program, steps):
    """(x [n, B, D], y [n, S, B, T], task [n, S, B], rare_counts [n, S]) for `steps`."""
    fn = jax.jit(jax.vmap(lambda t: (*program.batch(t), program.rare_counts(t))))
    return jax.device_get(fn(jnp.asarray(steps, jnp.int32)))


PLACEMENT_STEPS = 200


@pytest.fixture(scope="module")
def placement():
    """One program (B = 256, gaps 2, 3, 5) and its first 200 batches, computed under jit."""
    program = program_for(batch_size=256, num_steps=PLACEMENT_STEPS)
    return program, batches(program, np.arange(PLACEMENT_STEPS))


def test_rare_examples_sit_at_the_last_step_of_each_cycle(placement):
    program, (x, y, task, rare_counts) = placement
    rare, batch_size = program.rare_task, program.sweep.batch_size
    assert rare == 4  # The rarest task by default.
    assert task.shape == (PLACEMENT_STEPS, len(GAPS), batch_size)
    for s, gap in enumerate(GAPS):
        counts = Injection(gap=GAPS).counts(gap, batch_size, RATE, PLACEMENT_STEPS // gap)
        expected = np.array([counts[t // gap] if t % gap == gap - 1 else 0
                             for t in range(PLACEMENT_STEPS)])
        assert expected.sum() == math.floor((PLACEMENT_STEPS // gap) * gap * batch_size * RATE)
        np.testing.assert_array_equal((task[:, s] == rare).sum(axis=1), expected,
                                      err_msg=f"gap={gap}")
        np.testing.assert_array_equal(rare_counts[:, s], expected, err_msg=f"gap={gap}")
        # Eager calls agree with the vmapped ones.
        for t in (gap - 1, 2 * gap - 1, gap):
            np.testing.assert_array_equal(np.asarray(program.rare_counts(t))[s], expected[t])
    # Every stream's task ids are sorted and in range; targets belong to that stream's tasks.
    assert np.all(np.diff(task, axis=-1) >= 0)
    assert task.min() >= 0 and task.max() < MIX.num_tasks
    sqrt_spectra = jnp.sqrt(jnp.asarray(MIX.spectra(), jnp.float32))
    for t in (0, 4, 9):
        for s in range(len(GAPS)):
            np.testing.assert_array_equal(y[t, s], tasks.targets(x[t], task[t, s], sqrt_spectra))


def test_injection_step_can_be_all_rare():
    program = program_for(batch_size=16, gaps=(4,), rate=0.25)  # gap·rate = 1.
    batch = jax.jit(program.batch)
    rare_per_step = [int((batch(t)[2][0] == program.rare_task).sum()) for t in range(12)]
    assert rare_per_step == [0, 0, 0, 16] * 3


def test_other_tasks_follow_the_renormalised_prior(placement):
    program, (_, _, task, _) = placement
    rare = program.rare_task
    prior = MIX.prior_array()
    others = np.delete(np.arange(MIX.num_tasks), rare)
    renormalised = prior[others] / prior[others].sum()
    for s in range(len(GAPS)):
        ids = task[:, s].ravel()
        ids = ids[ids != rare]
        freq = np.bincount(ids, minlength=MIX.num_tasks)[others] / ids.size
        stderr = np.sqrt(renormalised * (1 - renormalised) / ids.size)
        assert np.all(np.abs(freq - renormalised) < 4 * stderr), (freq, renormalised)


def test_streams_share_inputs(placement):
    program, (x, y, task, _) = placement
    assert y.shape[1] == task.shape[1] == len(GAPS)
    # The same inputs as a run without injection, or with one gap, at the same data seed.
    plain = sweep.SweepProgram(MIX, program.sweep)
    single = program_for(batch_size=256, gaps=(3,))
    steps = jnp.asarray([0, 4, 9], jnp.int32)
    for other in (plain, single):
        x_other = jax.jit(jax.vmap(lambda t, other=other: other.batch(t)[0]))(steps)
        np.testing.assert_array_equal(x[np.asarray(steps)], x_other)


def test_batches_are_deterministic_across_restarts_and_call_orders(placement):
    _, (x, y, task, _) = placement
    steps = [0, 1, 4, 9, 14, 29, 199]
    fresh = program_for(batch_size=256, num_steps=PLACEMENT_STEPS)  # A restart.
    batch = jax.jit(fresh.batch)
    for t in reversed(steps):  # Visited backwards, one step at a time.
        for a, b in zip(jax.device_get(batch(t)), (x[t], y[t], task[t])):
            np.testing.assert_array_equal(a, b)
    # Different steps do give different batches.
    assert not np.array_equal(x[0], x[1]) and not np.array_equal(task[0], task[1])


# --- record steps -----------------------------------------------------------------------------

@pytest.mark.parametrize("num_steps, record_every, interference_every, gaps", [
    (50, 7, 0, (3, 8)),
    (64, 16, 5, (4,)),
    (20, 100, 0, (6, 25)),  # A gap longer than the run injects nothing.
    (1, 1, 1, (1,)),
])
def test_record_steps_hold_every_injection_pair(num_steps, record_every, interference_every,
                                                gaps):
    spec = Sweep(widths=(1,), num_steps=num_steps, record_every=record_every,
                       interference_every=interference_every)
    steps = spec.record_steps(Injection(gap=gaps))
    assert steps == sorted(set(steps))
    expected = {0, num_steps, *range(0, num_steps + 1, record_every)}
    if interference_every:
        expected.update(range(0, num_steps + 1, interference_every))
    for gap in gaps:
        for end in range(gap, num_steps + 1, gap):
            assert end - 1 in steps and end in steps, (gap, end)
            expected.update((end - 1, end))
    assert set(steps) == expected
    assert steps[0] == 0 and steps[-1] == num_steps


def test_record_steps_without_injection():
    spec = Sweep(widths=(1,), num_steps=25, record_every=10)
    assert spec.record_steps() == [0, 10, 20, 25]
    assert spec.record_steps(None) == [0, 10, 20, 25]


# --- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, text", [
    ({"gap": 0}, "Injection.gap: 0"),
    ({"gap": (4, 0)}, "Injection.gap: 0"),
    ({"gap": -3}, "Injection.gap: -3"),
    ({"gap": 2.5}, "Injection.gap: 2.5"),
    ({"gap": True}, "Injection.gap: True"),
    ({"gap": ()}, "Injection.gap=[]"),
    ({"gap": (4, 8, 4)}, "Injection.gap=[4, 8, 4] has duplicates"),
    ({"rate": 0}, "Injection.rate=0 "),
    ({"rate": 0.0}, "Injection.rate=0.0 "),
    ({"rate": 1.5}, "Injection.rate=1.5 "),
    ({"rate": -0.1}, "Injection.rate=-0.1 "),
    ({"rate": float("nan")}, "Injection.rate=nan"),
    ({"rare_task": -1}, "Injection.rare_task=-1 "),
])
def test_bad_injection_is_rejected(kwargs, text):
    with pytest.raises(ConfigError, match=re.escape(text)):
        Injection(**kwargs)


@pytest.mark.parametrize("kwargs, text", [
    ({"rare_task": 5}, "Injection.rare_task=5 "),
    ({"rare_task": 99}, "Injection.rare_task=99 "),
    ({"gap": 20, "rate": 0.1}, "Injection.gap=20 "),
    ({"gap": (2, 40), "rate": 0.05}, "Injection.gap=40 "),
    ({"gap": 16}, "Injection.gap=16 "),  # Default rate π_r ≈ 0.088: 16·π_r > 1.
])
def test_injection_that_does_not_fit_the_mixture_is_rejected(kwargs, text):
    spec = Sweep(widths=(1,), batch_size=32, num_steps=10)
    with pytest.raises(ConfigError, match=re.escape(text)):
        sweep.SweepProgram(MIX, spec, Injection(**kwargs))


def test_boundary_injection_is_accepted():
    spec = Sweep(widths=(1,), batch_size=32, num_steps=10)
    program = sweep.SweepProgram(MIX, spec, Injection(gap=(1, 4), rate=0.25, rare_task=0))
    assert program.rare_task == 0
    assert Injection(rate=1.0).rate == 1.0


# --- end to end: retention arrays and interference records -----------------------------------

E2E_MIX = TaskMixture(num_tasks=4, task_dim=2, input_dim=8, beta=1.0)
E2E_SWEEP = Sweep(widths=(3,), seeds=(0,), batch_size=32, num_steps=20, record_every=7,
                        warmup_steps=2, learning_rate=3e-2, interference_every=4)
E2E_INJECTION = Injection(gap=(3, 5))  # Default rate π_r = 0.12.


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("injection_run"))
    Run(sweep.SweepProgram(E2E_MIX, E2E_SWEEP, E2E_INJECTION), workdir,
        show_progress=False).execute()
    return store.open_metrics(workdir + "/metrics")


def expected_retention(metrics):
    steps = metrics.read("step").tolist()
    index = {step: r for r, step in enumerate(steps)}
    rare = rarest_task(E2E_MIX.prior_array())
    widths, gaps = metrics.read("width"), metrics.read("gap")
    corrected = theory.corrected_alignment(metrics.read("alignment")[:, :, rare], widths[None],
                                           E2E_MIX.input_dim)
    num_steps = E2E_SWEEP.num_steps
    cycles = num_steps // min(E2E_INJECTION.gaps)
    gain = np.full((cycles, len(gaps)), np.nan)
    decay = np.full((cycles, len(gaps)), np.nan)
    for m, gap in enumerate(gaps):
        for c in range(cycles):
            after = (c + 1) * gap  # State just after cycle c's injection (in step after − 1).
            if after <= num_steps:
                gain[c, m] = corrected[index[after], m] - corrected[index[after - 1], m]
            before_next = after + gap - 1  # State just before the next injection.
            if before_next <= num_steps:
                decay[c, m] = corrected[index[after], m] - corrected[index[before_next], m]
    return gain, decay


def test_run_records_the_injection_schedule(e2e_run):
    assert e2e_run.read("step").tolist() == E2E_SWEEP.record_steps(E2E_INJECTION)
    assert e2e_run.read("gap").tolist() == [3, 5]
    assert e2e_run.read("width").tolist() == [3, 3]


def test_retention_arrays_are_differences_of_corrected_rare_alignment(e2e_run):
    gain, decay = expected_retention(e2e_run)
    assert gain.shape == (20 // 3, 2)
    for name, expected in (("retention_gain", gain), ("retention_decay", decay)):
        got = e2e_run.read(name)
        assert got.shape == expected.shape, name
        assert e2e_run.axes(name) == ("cycle", "model")
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=name)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)
    # NaN past each model's last cycle: gap 3 has 6 cycles, gap 5 has 4.
    gaps = e2e_run.read("gap")
    assert np.all(np.isfinite(gain[:, gaps == 3])) and np.all(np.isfinite(gain[:4, gaps == 5]))
    assert np.all(np.isnan(gain[4:, gaps == 5]))
    assert np.all(np.isnan(decay[3:, gaps == 5])) and np.all(np.isfinite(decay[:3]))
    # Injections move the rare alignment, so the check is not vacuous.
    assert np.nanmax(np.abs(gain)) > 1e-4


def test_interference_is_nan_exactly_off_its_schedule(e2e_run):
    on = e2e_run.read("step") % E2E_SWEEP.interference_every == 0
    assert on.any() and not on.all()
    for name in ("interference", "interference_gram", "grad_norm", "rare_frequent_cosine"):
        values = e2e_run.read(name)
        axes = tuple(range(1, values.ndim))
        np.testing.assert_array_equal(np.isnan(values).all(axis=axes), ~on, err_msg=name)
        np.testing.assert_array_equal(np.isfinite(values).all(axis=axes), on, err_msg=name)

"""End to end: small sweeps train to the closed-form theory (docs/method.md §3.1, §4.3-§4.4)."""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from rareret.analysis import phase, report
from rareret.run import Run
from rareret.synthetic import model, sweep
from rareret.synthetic.spec import Sweep, TaskMixture


def run(tmp_path, mixture, spec):
    Run(sweep.SweepProgram(mixture, spec), str(tmp_path), show_progress=False).execute()
    return phase.SyntheticRun.load(str(tmp_path))


def test_a_chunk_trains_each_step_on_that_steps_batch():
    """A chunk's steps (each step's targets taken from the inputs carried into it) equal steps
    taken one at a time on `batch(step)`, up to float32 reordering: every model, two streams."""
    mixture = TaskMixture(num_tasks=5, task_dim=3, input_dim=24, beta=1.0)
    spec = Sweep(widths=(2, 7), seeds=(0, 1), rare_multiplier=(1.0, 4.0), batch_size=64,
                 num_steps=6, record_every=6, warmup_steps=2, tile_size=8)
    program = sweep.SweepProgram(mixture, spec)

    @jax.jit
    def step(state, t):  # On the state as the packed model holds it (`per_stream`).
        x_BxD, y_SxBxT, task_SxB = program.batch(t)
        tiles = jax.vmap(lambda task_B: model.task_tiles(
            task_B, mixture.num_tasks, spec.tile_size))(task_SxB)
        losses_M, grads = program.gradients(state, x_BxD, y_SxBxT, tiles)
        rare_S = jax.numpy.sum(task_SxB == program.rare_task, axis=1)
        return program._apply_updates(state, losses_M, grads), losses_M, rare_S

    state, losses, rare = per_stream(program.init()), [], []
    for t in range(spec.num_steps):
        state, losses_M, rare_S = step(state, t)
        losses.append(losses_M)
        rare.append(rare_S)
    chunk = program.train(program.init(), 0, spec.num_steps)
    np.testing.assert_allclose(chunk["train_loss"], np.mean(losses, axis=0), rtol=1e-5)
    np.testing.assert_allclose(
        chunk["rare_rate"], np.mean(rare, axis=0)[program.stream_M] / spec.batch_size, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(sweep.unstacked(chunk["params"])),
                         jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def per_stream(state):
    """`state` with its grouped entries as the packed model holds them: one group per (stream,
    width), copies first (`sweep.unstacked`)."""
    return {**state, **{name: sweep.unstacked(state[name]) for name in sweep.GROUPED_STATE}}


def test_phase_diagram_matches_theorem3(tmp_path):
    mixture = TaskMixture(num_tasks=8, task_dim=8, input_dim=64, beta=1.5, alpha=2.0)
    spec = Sweep(widths=(1, 2, 4, 8, 16, 32), batch_size=256, num_steps=5000,
                       record_every=1000, learning_rate=3e-3, warmup_steps=500)
    result = run(tmp_path, mixture, spec)
    assert result.metrics.read("step").tolist() == [0, 1000, 2000, 3000, 4000, 5000]
    comparison = phase.compare_with_theory(result)
    assert comparison.mean_abs_error <= 0.05, comparison.observed_WxK
    assert np.all(comparison.grid_steps_off() <= 1), (
        comparison.observed_critical_K, comparison.predicted_critical_K)
    # The wide model has learned more of every task than the narrow one, as theory says.
    loss = result.final("task_loss")
    assert np.all(loss[-1] <= loss[0] + 1e-3)
    report_path = report.write_report(str(tmp_path))
    assert "Mean |observed − predicted|" in open(report_path).read()


def test_rank1_critical_width_is_task_index(tmp_path):
    num_tasks = 12
    mixture = TaskMixture(num_tasks=num_tasks, task_dim=1, input_dim=24, beta=1.5)
    spec = Sweep(widths=tuple(range(1, num_tasks + 1)), batch_size=256, num_steps=5000,
                       record_every=5000, learning_rate=1e-2, warmup_steps=500)
    comparison = phase.compare_with_theory(run(tmp_path, mixture, spec))
    np.testing.assert_array_equal(comparison.observed_critical_K, np.arange(1, num_tasks + 1))
    # Rank 1: learned ⇔ alignment s_k > 0.5, the paper's criterion.
    alignment = phase.SyntheticRun.load(str(tmp_path)).final("alignment")
    np.testing.assert_array_equal(alignment > 0.5, comparison.observed_WxK <= 0.5)


def test_records_hold_every_metric(tmp_path):
    mixture = TaskMixture(num_tasks=4, task_dim=2, input_dim=8, beta=1.0)
    spec = Sweep(widths=(2, 3), seeds=(0, 1), learning_rate=(1e-3, 1e-2), batch_size=32,
                       num_steps=25, record_every=10, warmup_steps=5)
    metrics = run(tmp_path, mixture, spec).metrics
    assert metrics.read("step").tolist() == [0, 10, 20, 25]
    assert metrics.read("task_loss").shape == (4, 8, 4)
    assert metrics.axes("task_loss") == ("record", "model", "task")
    assert metrics.read("width").tolist() == [2, 2, 2, 2, 3, 3, 3, 3]
    assert metrics.read("seed").tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    np.testing.assert_allclose(metrics.read("prior"), mixture.prior_array(), rtol=1e-6)
    assert np.isnan(metrics.read("train_loss")[0]).all()  # Nothing trained before step 0.
    assert np.isfinite(metrics.read("train_loss")[1:]).all()
    # Initial population loss: decoders are random, so loss > 1 - but never negative.
    assert (metrics.read("task_loss") >= 0).all()
    frequent = metrics.read("frequent")
    delta_f = metrics.read("delta_f")
    weights = (mixture.prior_array() * mixture.traces())[frequent]
    expected = np.sum(weights * (1 - metrics.read("alignment")[..., frequent]), axis=-1)
    np.testing.assert_allclose(delta_f, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learning_rate", [1e-3, 4e-3])
def test_learning_rates_share_one_program(tmp_path, learning_rate):
    """A model's run inside a learning-rate sweep equals the same model swept alone."""
    mixture = TaskMixture(num_tasks=4, task_dim=2, input_dim=8, beta=1.0)
    common = dict(widths=(3,), batch_size=32, num_steps=30, record_every=30, warmup_steps=5)
    both = run(tmp_path / "both", mixture, Sweep(learning_rate=(1e-3, 4e-3), **common))
    alone = run(tmp_path / "alone", mixture, Sweep(learning_rate=learning_rate, **common))
    index = [1e-3, 4e-3].index(learning_rate)
    np.testing.assert_allclose(both.final("task_loss")[index], alone.final("task_loss")[0],
                               rtol=1e-4)


DIVERGENCE_MIXTURE = TaskMixture(num_tasks=4, task_dim=3, input_dim=16, beta=1.0)
DIVERGENCE_SWEEP = dict(widths=(2, 5), batch_size=64, num_steps=6, record_every=6,
                        warmup_steps=1)


def stepwise(learning_rates):
    """The params [steps + 1] (numpy), `diverged` and `train_loss` [steps] of a sweep of
    `learning_rates`, trained one step per call."""
    program = sweep.SweepProgram(DIVERGENCE_MIXTURE, Sweep(learning_rate=learning_rates,
                                                           **DIVERGENCE_SWEEP))
    state = program.init()
    params, diverged, losses = [jax.device_get(state["params"])], [], []
    for t in range(DIVERGENCE_SWEEP["num_steps"]):
        state = program.train(state, t, t + 1)  # Donates the state it is given.
        params.append(jax.device_get(state["params"]))
        diverged.append(np.asarray(state["diverged"]))
        losses.append(np.asarray(state["train_loss"]))
    return params, np.array(diverged), np.array(losses)


def copy_params(params, c):
    """Copy c's parameters in every width group."""
    return [leaf[c] for leaf in jax.tree.leaves(sweep.unstacked(params))]


def test_a_diverging_model_is_frozen_at_its_last_finite_state():
    """Learning rate 1e30: the first step's update is finite (≈ 1e30), the next step's loss is
    not. The model is flagged at that step and keeps, from then on, its parameters from before
    it (finite); the other models are bit-identical to a sweep without it."""
    params, diverged, losses = stepwise((1e-3, 1e30))
    sane_params, sane_diverged, _ = stepwise((1e-3, 2e-3))
    absurd = np.arange(diverged.shape[1]) % 2 == 1  # Models (width, lr): lr is the fast axis.
    assert not sane_diverged.any() and not diverged[:, ~absurd].any()
    first = 1  # The first step with a non-finite loss; flagged from it on.
    assert np.isfinite(losses[:first]).all() and not np.isfinite(losses[first, absurd]).any()
    assert (diverged[:, absurd] == (np.arange(len(diverged)) >= first)[:, None]).all()
    for t in range(first + 1, len(params)):
        for got, want in zip(copy_params(params[t], 1), copy_params(params[first], 1)):
            assert np.isfinite(want).all()
            np.testing.assert_array_equal(got, want)
    assert np.abs(copy_params(params[first], 1)[0]).max() > 1e20  # It did take its first step.
    for t in range(len(params)):
        for got, want in zip(copy_params(params[t], 0), copy_params(sane_params[t], 0)):
            np.testing.assert_array_equal(got, want)


def test_a_non_finite_loss_alone_freezes_its_model():
    """A model whose loss is non-finite with finite gradients (as when the loss's square
    overflows) is frozen and flagged; the others take their step."""
    program = sweep.SweepProgram(DIVERGENCE_MIXTURE, Sweep(learning_rate=(1e-3, 2e-3),
                                                           **DIVERGENCE_SWEEP))
    state = per_stream(program.init())
    x_BxD, y_SxBxT, task_SxB = jax.jit(program.batch)(0)
    tiles = jax.vmap(lambda task_B: model.task_tiles(
        task_B, DIVERGENCE_MIXTURE.num_tasks, program.sweep.tile_size))(task_SxB)
    losses_M, grads = jax.jit(program.gradients)(state, x_BxD, y_SxBxT, tiles)
    poisoned = losses_M.at[1].set(np.inf)
    new = jax.device_get(jax.jit(program._apply_updates)(state, poisoned, grads))
    assert new["diverged"].tolist() == [False, True, False, False]
    old = jax.device_get(state)
    for m, (group, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for got, want in zip(jax.tree.leaves(new["params"][group]),
                             jax.tree.leaves(old["params"][group])):
            assert np.array_equal(got[c], want[c]) == (m == 1)


DEFAULT_GIN = pathlib.Path(__file__).resolve().parents[1] / "gin_configs/synthetic/default.gin"


def test_default_config_matches_readme(tmp_path):
    """README on gin_configs/synthetic/default.gin, run as is through the CLI: a width-2 encoder
    learns only the two most frequent of 16 tasks, each doubling of width learns the next rarer
    tasks, the observed critical width of every task equals the predicted one, and the mean
    |observed − predicted| normalised loss is ≈ 0.005. About a minute on 2 cores."""
    subprocess.run([sys.executable, "-m", "rareret.main", f"--gin_file={DEFAULT_GIN}",
                    f"--workdir={tmp_path}", "--noreport", "--noprogress"],
                   check=True, capture_output=True)
    result = phase.SyntheticRun.load(str(tmp_path))
    assert result.mixture.num_tasks == 16 and result.sweep.widths[0] == 2
    widths, num_tasks = sorted(result.sweep.widths), result.mixture.num_tasks
    assert widths == [2 * 2 ** i for i in range(len(widths))]  # Doublings.
    comparison = phase.compare_with_theory(result)
    threshold_K = phase.learned_threshold(result.mixture)
    learned_WxK = comparison.observed_WxK <= threshold_K
    priors_K = result.mixture.prior_array()
    assert np.all(np.diff(priors_K) < 0)  # Task index = frequency rank.
    message = (f"learned per width {learned_WxK.sum(axis=1)}; observed critical widths "
               f"{comparison.observed_critical_K}, predicted {comparison.predicted_critical_K}; "
               f"mean |obs − pred| {comparison.mean_abs_error:.4f}\n{comparison.observed_WxK}")
    np.testing.assert_array_equal(np.flatnonzero(learned_WxK[0]), [0, 1], err_msg=message)
    # Each width learns a prefix of the tasks in frequency order, longer at every doubling
    # until all are learned.
    counts_W = learned_WxK.sum(axis=1)
    np.testing.assert_array_equal(learned_WxK, np.arange(num_tasks)[None] < counts_W[:, None],
                                  err_msg=message)
    growing = counts_W[:-1] < num_tasks
    assert np.all(np.diff(counts_W)[growing] > 0), message
    assert counts_W[-1] == num_tasks, message
    # Observed = predicted, task by task and width by width.
    np.testing.assert_array_equal(comparison.observed_critical_K,
                                  comparison.predicted_critical_K, err_msg=message)
    np.testing.assert_array_equal(learned_WxK, comparison.predicted_WxK <= threshold_K,
                                  err_msg=message)
    assert comparison.mean_abs_error < 0.01, message  # README: ≈ 0.005.

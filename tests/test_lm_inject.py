"""Injected LM tasks (rareret/lm/inject.py) against docs/method.md §6.5-§6.6."""

import math

import numpy as np
import pytest

from rareret.errors import ConfigError
from rareret.lm.inject import (
    Injector, TaskSpec, build_task, eval_batch, injection_order, label_candidates)

VOCAB, EOS = 50304, 50279
RESERVED = (0, 1, EOS)


def task(kind="cmp", seed=0, **schedule):
    schedule = schedule or {"every_n": 1}
    return build_task(TaskSpec(kind, f"{kind}{seed}", seed=seed, **schedule), VOCAB, RESERVED)


def value_of(t):
    return dict(zip(t.tokens.tolist(), t.values.tolist()))


def random_batch(b, length, seed=0):
    return np.random.default_rng(seed).integers(2, 1000, size=(b, length), dtype=np.int32)


@pytest.mark.parametrize("kind", ["cmp", "add"])
def test_task_definition(kind):
    t = task(kind)
    assert len(set(t.tokens.tolist())) == 100
    assert sorted(t.values.tolist()) == list(range(100))
    assert not set(t.tokens.tolist()) & set(RESERVED)
    assert len(t.label_tokens) == (2 if kind == "cmp" else 0)
    assert len(set(t.label_tokens.tolist()) | set(t.tokens.tolist()) | set(RESERVED)) == (
        len(t.label_tokens) + 100 + len(RESERVED))
    assert t.train.shape == t.test.shape == (5000, 3)
    pairs = {tuple(r) for r in np.concatenate([t.train, t.test])[:, :2].tolist()}
    assert len(pairs) == 10000  # all ordered pairs, TOK1 = TOK2 included; train ∩ test = ∅.
    val = value_of(t)
    for a, b, label in np.concatenate([t.train, t.test]).tolist():
        if kind == "cmp":
            assert label == t.label_tokens[0 if val[a] < val[b] else 1]
        else:
            assert val[label] == (val[a] + val[b]) % 100
    assert set(label_candidates(t).tolist()) == set(
        np.concatenate([t.train, t.test])[:, 2].tolist())


def test_task_seeds():
    a, b, c = task(seed=3), task(seed=3), task(seed=4)
    for field in ("tokens", "values", "label_tokens", "train", "test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.tokens, c.tokens) and not np.array_equal(a.train, c.train)


def test_eval_batch():
    t = task("add")
    tokens_BxI, label_pos = eval_batch(t, EOS)
    np.testing.assert_array_equal(tokens_BxI[:, :3], t.test)
    assert (tokens_BxI[:, 3] == EOS).all() and label_pos == 2
    np.testing.assert_array_equal(eval_batch(t, EOS, "train")[0][:, :3], t.train)
    with pytest.raises(ConfigError, match="split='val'"):
        eval_batch(t, EOS, "val")


def check_placement(batch, out, mask, injector, step):
    rows = np.flatnonzero(mask.any(axis=1))
    assert sum(injector.counts(step).values()) == len(rows)
    expected_mask = np.zeros_like(mask)
    expected_mask[rows, :4] = True
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_array_equal(out[~mask], batch[~mask])
    assert (out[rows, 3] == EOS).all()
    return rows


def test_placement_and_stream():
    t = task("cmp", every_n=1)
    injector = Injector([t], global_batch=8, seq_len=16, eos_id=EOS, seed=1)
    train = {tuple(r) for r in t.train.tolist()}
    seen = []
    for step in range(5000):
        batch = random_batch(8, 16, step)
        out, mask = injector.inject(batch, step)
        rows = check_placement(batch, out, mask, injector, step)
        assert out.dtype == batch.dtype and len(rows) == 1
        seen.append(tuple(out[rows[0], :3].tolist()))
    assert set(seen) == train  # every train instance once before any repeats.


def test_frequency_counts():
    t = task("cmp", frequency_per_token=2.4e-5)
    injector = Injector([t], 1024, 4096, EOS)
    assert {injector.counts(s)["cmp0"] for s in range(100)} == {100, 101}
    for f in (2.4e-5, 2.4e-6, 2.4e-7, 2.4e-8, 1 / 4096, 3.7e-9):
        injector = Injector([task("cmp", frequency_per_token=f)], 1024, 4096, EOS)
        counts = [injector.counts(s)["cmp0"] for s in range(1000)]
        assert sum(counts) == math.floor(1000 * f * 1024 * 4096)
        assert max(counts) - min(counts) <= 1
    rare = Injector([task("cmp", frequency_per_token=2.4e-8)], 1024, 4096, EOS)
    counts = np.array([rare.counts(s)["cmp0"] for s in range(1000)])
    assert set(np.diff(np.flatnonzero(counts))) <= {9, 10}  # one every ~10 batches.
    exact = Injector([task("add", frequency_per_token=0.001)], 10, 25, EOS)  # 1/4 per batch.
    assert [exact.counts(s)["add0"] for s in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]


def test_matched_frequency():
    t = task("add", every_n=10)
    injector = Injector([t], 16, 8, EOS, seed=2)
    for step in range(40):
        batch = random_batch(16, 8, step)
        out, mask = injector.inject(batch, step)
        rows = check_placement(batch, out, mask, injector, step)
        assert len(rows) == (10 if step % 10 == 9 else 0)
        assert {tuple(r) for r in out[rows, :3].tolist()} <= {tuple(r) for r in t.train.tolist()}


def test_several_tasks():
    cmp, add = task("cmp", every_n=5), task("add", frequency_per_token=0.01)  # 1.28 per batch.
    injector = Injector([cmp, add], 16, 8, EOS, seed=3)
    cmp_set = {tuple(r) for r in cmp.train.tolist()}
    add_set = {tuple(r) for r in add.train.tolist()}
    for step in range(20):
        batch = random_batch(16, 8, step)
        out, mask = injector.inject(batch, step)
        rows = check_placement(batch, out, mask, injector, step)
        written = [tuple(r) for r in out[rows, :3].tolist()]
        counts = injector.counts(step)
        assert sum(w in cmp_set for w in written) == counts["cmp0"]
        assert sum(w in add_set for w in written) == counts["add0"]


@pytest.mark.parametrize("schedule, batch, length, match", [
    ({"frequency_per_token": 7.8e-3}, 1024, 1024, "frequency_per_token=0.0078 injects up to 8179"),
    ({"frequency_per_token": 9.8e-4}, 1024, 1024, "frequency_per_token=0.00098 injects up to 1028"),
    ({"every_n": 17}, 16, 8, "every_n=17 injects up to 17"),
])
def test_over_capacity(schedule, batch, length, match):
    with pytest.raises(ConfigError, match=match):
        Injector([task("add", **schedule)], batch, length, EOS)


def test_total_over_capacity():
    Injector([task("add", frequency_per_token=1 / 1024)], 1024, 1024, EOS)  # One per sequence.
    with pytest.raises(ConfigError, match="up to 17 instances"):
        Injector([task("cmp", every_n=9), task("add", every_n=8)], 16, 8, EOS)


@pytest.mark.parametrize("kwargs, match", [
    ({"frequency_per_token": 1.0}, "frequency_per_token=1.0 must be in"),
    ({"frequency_per_token": 0.0}, "frequency_per_token=0.0 must be in"),
    ({"every_n": 0}, "every_n=0 must be"),
    ({"every_n": 2, "frequency_per_token": 0.1}, "exactly one"),
    ({}, "exactly one"),
])
def test_bad_spec(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TaskSpec("cmp", "x", **kwargs)


def test_bad_injector_values():
    t = task()
    whole_vocab = build_task(TaskSpec("cmp", "x", every_n=1), 102)  # Every id is a task token.
    with pytest.raises(ConfigError, match="eos_id=5"):
        Injector([whole_vocab], 8, 16, 5)
    with pytest.raises(ConfigError, match="seq_len=3"):
        Injector([t], 8, 3, EOS)
    with pytest.raises(ConfigError, match=r"needs ≥ 102"):
        build_task(TaskSpec("cmp", "x", every_n=1), 103, (0, 1))


def test_pure_function_of_step():
    injector = Injector([task("cmp", frequency_per_token=0.02), task("add", every_n=3)],
                        16, 8, EOS, seed=4)
    batch = random_batch(16, 8)
    forward = [injector.inject(batch, s) for s in range(12)]
    fresh = Injector([task("cmp", frequency_per_token=0.02), task("add", every_n=3)],
                     16, 8, EOS, seed=4)
    for s in [7, 0, 11, 3, 3, 5, 1, 2, 4, 6, 8, 9, 10]:
        for a, b in zip(fresh.inject(batch, s), forward[s]):
            np.testing.assert_array_equal(a, b)
    other = Injector(injector.tasks, 16, 8, EOS, seed=5)
    assert any(not np.array_equal(other.inject(batch, s)[1], forward[s][1]) for s in range(12))


def test_process_slices_match_single_process():
    tasks = [task("cmp", frequency_per_token=0.05), task("add", every_n=4)]
    single = Injector(tasks, 16, 8, EOS, seed=6)
    for step in range(12):
        batch = random_batch(16, 8, step)
        out, mask = single.inject(batch, step)
        for p in range(4):
            local = Injector(tasks, 16, 8, EOS, seed=6, process_index=p, process_count=4)
            rows = slice(4 * p, 4 * p + 4)
            local_out, local_mask = local.inject(batch[rows], step)
            np.testing.assert_array_equal(local_out, out[rows])
            np.testing.assert_array_equal(local_mask, mask[rows])


def test_distinct_injected_are_the_first_of_the_injection_order():
    """What `distinct_injected` / `injection_order` say was injected (the instances task_loss
    is measured on) is exactly the set of instances `inject` wrote, step after step, including
    past the first epoch; and `row_tasks` names the task of every written row."""
    tasks = [task("cmp", 1, frequency_per_token=0.01), task("add", 2, every_n=3)]
    injector = Injector(tasks, global_batch=16, seq_len=8, eos_id=EOS, seed=4)
    written = [set() for _ in tasks]
    for step in range(60):
        out, mask = injector.inject(random_batch(16, 8, step), step)
        rows = injector.row_tasks(step)
        assert np.array_equal(rows >= 0, mask.any(axis=1))
        for row in np.flatnonzero(rows >= 0):
            written[rows[row]].add(tuple(out[row, :3].tolist()))
        for k, (t, count) in enumerate(zip(tasks, injector.distinct_injected(step + 1))):
            first = {tuple(r) for r in t.train[injection_order(t)[:count]].tolist()}
            assert first == written[k], (step, t.spec.name)
    assert injector.distinct_injected(60) == [len(written[0]), len(written[1])] == [76, 60]

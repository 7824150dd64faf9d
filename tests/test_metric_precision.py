"""Recorded metrics keep their precision for nearly learned tasks (float32, any backend).

The population loss, the alignment s_k with its complement 1 − s_k, and the per-task gradients
are checked against float64 numpy computed from the same float32 parameters, at parameters
built to be nearly optimal (normalised losses ≈ 1e-6, 1 − s_k ≈ 1e-6). There a plain float32
evaluation is off by 1e-4 (a GEMM's rounding) to 1e-1 (the expanded square); each test also
checks that its parameters are hard enough to show that.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rareret.synthetic import model
from rareret.synthetic.spec import TaskMixture

MIXTURE = TaskMixture(num_tasks=4, task_dim=8, input_dim=64, beta=1.0, alpha=1.5)
K, T, D = MIXTURE.num_tasks, MIXTURE.task_dim, MIXTURE.input_dim
SQRT_SPECTRA_KxT = np.sqrt(MIXTURE.spectra()).astype(np.float32)
MAPS_KxTxD = np.asarray(model.task_maps(jnp.asarray(SQRT_SPECTRA_KxT), D), np.float64)
TRACE_K = np.sum(SQRT_SPECTRA_KxT.astype(np.float64) ** 2, axis=1)
WIDTHS = (16, 24)  # Hold task blocks 0–1 (+ half of block 2 at 24): tasks 0, 1 nearly learned.
LEARNED = 2  # Tasks 0..LEARNED−1 are fitted to ≈ 1e-6 in every model.
TOLERANCE = 1e-5


def near_optimal(size, scheme, seed, conditioning=1.0):
    """[C, N, D] encoders and [C, K, T, N] decoders, float32, fitting tasks 0..LEARNED−1 to a
    normalised loss of ≈ `size`.

    The encoder's rows are a random rotation of coordinates 0..N−1 (so task blocks 0..N/T−1
    lie in its row space), tilted out of it by ≈ sqrt(size) and scaled to singular values
    spread over [1/conditioning, 1]. Decoders are the least-squares optimum, then perturbed:
    "scaled" multiplies them by 1 + sqrt(size) (the residual sits on each target's own
    coordinates, against which the product cancels hardest); "random" adds noise.
    """
    rng = np.random.default_rng(seed)
    eps = np.sqrt(size)
    encoders, decoders = [], []
    for width in WIDTHS:
        rotation, _ = np.linalg.qr(rng.normal(size=(width, width)))
        left, _ = np.linalg.qr(rng.normal(size=(width, width)))
        singular = np.geomspace(1.0, 1.0 / conditioning, width)
        rows = rotation @ np.eye(width, D) + eps * rng.normal(size=(width, D)) / np.sqrt(D)
        w = (left * singular) @ rows
        w = w.astype(np.float32).astype(np.float64)
        optimum = np.einsum("ktd,dn->ktn", MAPS_KxTxD, np.linalg.pinv(w))
        if scheme == "scaled":
            d = optimum * (1 + eps)
        else:
            scale = np.linalg.norm(optimum, axis=2, keepdims=True)
            d = optimum + eps * scale * rng.normal(size=optimum.shape) / np.sqrt(width)
        encoders.append(w[None])
        decoders.append(d[None])
    return tuple({"encoder": jnp.asarray(e, jnp.float32), "decoders": jnp.asarray(d, jnp.float32)}
                 for e, d in zip(encoders, decoders))


def models64(params):
    """(encoder [N, D], decoders [K, T, N]) of every model, as float64 numpy."""
    for p in params:
        for e, d in zip(np.asarray(p["encoder"]), np.asarray(p["decoders"])):
            yield e.astype(np.float64), d.astype(np.float64)


def reference_residual(encoder, decoders):
    return np.einsum("ktn,nd->ktd", decoders, encoder) - MAPS_KxTxD


def reference_loss(params):
    return np.stack([np.sum(reference_residual(e, d) ** 2, axis=(1, 2)) / TRACE_K
                     for e, d in models64(params)])


def reference_alignment(params):
    """(s, 1 − s) [M, K] from an SVD basis of the row space and the complement's projector."""
    spectra_KxT = SQRT_SPECTRA_KxT.astype(np.float64) ** 2
    aligned, missed = [], []
    for encoder, _ in models64(params):
        _, _, vt = np.linalg.svd(encoder, full_matrices=True)
        width = encoder.shape[0]
        inside = np.sum(vt[:width, :K * T] ** 2, axis=0).reshape(K, T)
        outside = np.sum(vt[width:, :K * T] ** 2, axis=0).reshape(K, T)
        aligned.append(np.sum(spectra_KxT * inside, axis=1) / TRACE_K)
        missed.append(np.sum(spectra_KxT * outside, axis=1) / TRACE_K)
    return np.stack(aligned), np.stack(missed)


def relative_error(got, want):
    return np.max(np.abs(np.asarray(got, np.float64) - want) / np.abs(want))


_loss = jax.jit(model.population_task_loss)
_subspace_alignment = jax.jit(model.subspace_alignment)
_gradients = jax.jit(model.population_task_gradients)


@pytest.mark.parametrize("scheme", ["scaled", "random"])
def test_loss_of_nearly_learned_tasks(scheme):
    params = near_optimal(1e-6, scheme, seed=0)
    want = reference_loss(params)
    assert 1e-7 < want[:, :LEARNED].min() and want[:, :LEARNED].max() < 1e-5
    got = np.asarray(_loss(params, jnp.asarray(SQRT_SPECTRA_KxT)))
    assert relative_error(got, want) <= TOLERANCE, (got[:, :LEARNED], want[:, :LEARNED])
    # Hard enough: the expanded square ‖DW‖² − 2⟨DW, T⟩ + ‖T‖² in float32 is far off here.
    expanded = []
    for p in params:
        e, d = p["encoder"][0], p["decoders"][0]
        fitted = jnp.einsum("ktn,nm,ktm->k", d, e @ e.T, d)
        cross = jnp.einsum("ktn,nd,ktd->k", d, e, jnp.asarray(MAPS_KxTxD, jnp.float32))
        expanded.append((fitted - 2 * cross + TRACE_K.astype(np.float32)) / TRACE_K)
    assert relative_error(np.stack(expanded)[:, :LEARNED], want[:, :LEARNED]) > 1e-3


def test_loss_at_an_exact_fit_is_zero():
    # Encoder rows e_0..e_{N−1}, decoders the targets themselves: the residual is exactly 0.
    width = 2 * T
    encoder = jnp.eye(width, D)[None]
    decoders = jnp.asarray(MAPS_KxTxD[None, :, :, :width], jnp.float32)
    loss = np.asarray(_loss(({"encoder": encoder, "decoders": decoders},),
                            jnp.asarray(SQRT_SPECTRA_KxT)))
    np.testing.assert_array_equal(loss[0, :2], 0.0)
    np.testing.assert_allclose(loss[0, 2:], 1.0, rtol=1e-6)


@pytest.mark.parametrize("conditioning", [1.0, 100.0])
def test_alignment_and_its_complement(conditioning):
    params = near_optimal(1e-6, "random", seed=1, conditioning=conditioning)
    want_aligned, want_missed = reference_alignment(params)
    assert 1e-7 < want_missed[:, :LEARNED].min() and want_missed[:, :LEARNED].max() < 1e-5
    aligned, missed = (np.asarray(a) for a in _subspace_alignment(
        params, jnp.asarray(SQRT_SPECTRA_KxT)))
    assert relative_error(aligned, want_aligned) <= TOLERANCE
    assert relative_error(missed, want_missed) <= TOLERANCE, (missed, want_missed)
    assert np.all(aligned >= 0) and np.all(missed >= 0)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(model.alignment)(params, jnp.asarray(SQRT_SPECTRA_KxT))), aligned)
    # Hard enough: 1 − s from s rounded to float32 is off by ≥ 1e-3 relatively.
    rounded = 1 - want_aligned.astype(np.float32).astype(np.float64)
    assert relative_error(rounded[:, :LEARNED], want_missed[:, :LEARNED]) > 1e-3


@pytest.mark.parametrize("scheme", ["scaled", "random"])
def test_gradients_of_nearly_learned_tasks(scheme):
    params = near_optimal(1e-6, scheme, seed=2)
    maps = jnp.asarray(MAPS_KxTxD, jnp.float32)
    plain = []
    for p, (encoder, decoders) in zip(params, models64(params)):
        want = (2.0 / T) * np.einsum("ktn,ktd->knd", decoders,
                                     reference_residual(encoder, decoders))
        got = np.asarray(_gradients(p["encoder"][0], p["decoders"][0], maps), np.float64)
        error_K = np.linalg.norm((got - want).reshape(K, -1), axis=1)
        norm_K = np.linalg.norm(want.reshape(K, -1), axis=1)
        assert np.all(error_K <= TOLERANCE * norm_K), error_K / norm_K
        # A float32 GEMM for the residual (what precision=HIGHEST alone gives) is off by more.
        residual = jnp.einsum("ktn,nd->ktd", p["decoders"][0], p["encoder"][0],
                              precision=jax.lax.Precision.HIGHEST) - maps
        naive = np.asarray((2.0 / T) * jnp.einsum(
            "ktn,ktd->knd", p["decoders"][0], residual, precision=jax.lax.Precision.HIGHEST))
        plain.append(np.max((np.linalg.norm((naive - want).reshape(K, -1), axis=1)
                             / norm_K)[:LEARNED]))
    assert max(plain) > 3 * TOLERANCE


@pytest.mark.parametrize("width", [1, 7, 64, 1000])
def test_residual_is_exact_for_float32_inputs_whose_product_is_representable(width):
    # Inputs with few significant bits: every product and partial sum is exact in float32, so
    # `residual` must return left @ right − target exactly, whatever the scales of the rows.
    rng = np.random.default_rng(width)
    left = rng.integers(-8, 9, size=(3, width)) * 2.0 ** rng.integers(-30, 30, size=(3, 1))
    right = rng.integers(-8, 9, size=(width, 5)) * 2.0 ** rng.integers(-30, 30, size=(1, 5))
    target = left @ right * (1 + 2.0 ** -20)
    got = model.residual(jnp.asarray(left, jnp.float32), jnp.asarray(right, jnp.float32),
                         jnp.asarray(target, jnp.float32))
    want = left @ right - target.astype(np.float32)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=0)

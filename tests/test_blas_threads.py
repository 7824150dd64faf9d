"""The BLAS limit the sweep runs under reaches the OpenBLAS behind jaxlib's CPU LAPACK."""

import jax.numpy as jnp
import threadpoolctl

from rareret.blas_threads import single_threaded_blas


def test_single_threaded_blas_limits_every_loaded_blas():
    jnp.linalg.eigh(jnp.eye(3)).eigenvalues.block_until_ready()  # Loads jaxlib's LAPACK.
    with single_threaded_blas():
        blas = [info for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
        assert any("scipy" in info["filepath"] for info in blas), blas
        assert all(info["num_threads"] == 1 for info in blas), blas

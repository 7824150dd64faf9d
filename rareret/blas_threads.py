"""Keeps OpenBLAS's worker threads from competing with XLA's for the CPU cores.

On CPU, jaxlib runs eigh and QR through scipy's OpenBLAS/LAPACK. After each call OpenBLAS's
worker threads busy-wait, and on a small machine they steal the cores XLA's own thread pool is
training on: on 2 cores, the training chunk after a record (one batched eigh for the
alignments) ran measurably slower than the others; with one BLAS thread the difference is
gone. The LAPACK calls here are on matrices of at most D × D (a sweep's alignments, an LM
probe's SVDs of [tokens, d_model]), so one thread costs nothing.
"""

from __future__ import annotations

import scipy.linalg  # noqa: F401  (loads the OpenBLAS that jaxlib calls, so it can be limited)
import threadpoolctl


def single_threaded_blas() -> threadpoolctl.threadpool_limits:
    """A context manager limiting every loaded BLAS library to one thread while it is open."""
    return threadpoolctl.threadpool_limits(limits=1, user_api="blas")

"""Makes glibc's malloc reuse freed memory, so XLA CPU steps stop paying for page faults.

XLA's CPU runtime allocates every execution's temporaries afresh. glibc serves a large block
with mmap (or from a per-thread arena, whose heaps are capped at 64 MiB) and unmaps it again when
it is freed, so each step touches tens of MiB of new pages: on 2 cores, a small MLP stack's
training step took thousands of minor page faults per call and ran far below the GEMM rate;
with the settings below the faults fell to a few hundred and the step (and the `cpu-small` LM
step) ran markedly faster. glibc then keeps the process's peak heap for reuse.

Only long-running training processes call this (the CLI's LM runs, the LM benchmark), before
JAX starts its CPU backend: threads created earlier keep the arena they already have. The toy
sweep does not: it runs whole chunks of steps as one execution, allocates little per step, and
measured slower with a single arena.

The heap then only grows: blocks freed between differently sized ones (a checkpoint's host
copies, a record's temporaries) stay resident beside the next step's temporaries, and the peak
crept up with every save. `release_free_memory` gives their pages back at such points, and
`release_after_compilations` after every XLA compilation: the compiler's freed memory, left
resident, lay scattered between live blocks, and the program's first run then took fresh
memory for its temporaries beside it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**30  # Bytes of free heap top kept before glibc returns memory to the OS.


def _glibc():
    """The C library if it is glibc, else None (macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def reuse_freed_memory() -> bool:
    """Sets glibc malloc to one arena, no mmap'd blocks and no trimming; False off glibc."""
    libc = _glibc()
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return libc is not None and all(libc.mallopt(param, value) == 1
                                    for param, value in settings)


def release_free_memory() -> None:
    """Returns the pages of every free heap block to the OS (glibc's `malloc_trim`); they are
    faulted in again when reused. Off glibc, nothing."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# jax's event after each XLA compilation (jax/_src/dispatch.py's BACKEND_COMPILE_EVENT).
_COMPILED_EVENT = "/jax/core/compile/backend_compile_duration"
_listening = False


def release_after_compilations() -> None:
    """Calls `release_free_memory` after every XLA compilation in this process, before the
    compiled program first runs (a `jax.monitoring` listener; registered once)."""
    global _listening
    if not _listening:
        import jax

        jax.monitoring.register_event_duration_secs_listener(_after_compilation)
        _listening = True


def _after_compilation(event: str, duration_secs: float, **kwargs) -> None:
    if event == _COMPILED_EVENT:
        release_free_memory()

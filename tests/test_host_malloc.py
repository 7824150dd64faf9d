"""After `reuse_freed_memory`, a worker thread that allocates, touches and frees a large block
again and again stops taking fresh page faults (glibc reuses the block instead of unmapping it),
`release_free_memory` gives a freed block's pages back, and after `release_after_compilations`
every XLA compilation does.
Each case runs in a fresh interpreter, since malloc settings are process-wide."""

import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util, resource, sys, threading
from rareret import host_malloc
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 96 * 2**20  # Above the 64 MiB cap of a thread arena's heap.
if sys.argv[1] == "reuse":
    assert host_malloc.reuse_freed_memory()
faults = []
def work():  # A new thread, as XLA's executors are: it gets its arena on its first malloc.
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(SIZE)
        ctypes.memset(block, 1, SIZE)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(max(faults[1:]))
"""


def faults_per_reuse(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 96 * 2**20 // 4096
    assert faults_per_reuse("default") > pages // 2  # Fresh pages on every allocation.
    assert faults_per_reuse("reuse") < pages // 20


FREED_BLOCK = """
import ctypes, ctypes.util, sys
from rareret import host_malloc
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
def free_a_touched_block(mib):  # Kept resident: glibc no longer trims.
    block = libc.malloc(mib * 2**20)
    ctypes.memset(block, 1, mib * 2**20)
    libc.free(block)
assert host_malloc.reuse_freed_memory()
"""

RELEASE_PROBE = FREED_BLOCK + """
free_a_touched_block(96)
kept = rss_mb()
host_malloc.release_free_memory()
print(kept - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_release_free_memory_returns_the_freed_pages():
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True,
                         check=True)
    assert float(out.stdout) > 80  # MB of the freed 96 MiB block.


COMPILE_PROBE = FREED_BLOCK + """
if sys.argv[1] == "listen":
    host_malloc.release_after_compilations()
import jax
jax.devices()  # The backend starts; nothing is compiled yet.
free_a_touched_block(256)
kept = rss_mb()
jax.jit(lambda x: x + 1).lower(1.0).compile()
print(kept - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_compilations_return_the_freed_pages():
    def released_mb(mode: str) -> float:
        return float(subprocess.run([sys.executable, "-c", COMPILE_PROBE, mode],
                                    capture_output=True, text=True, check=True).stdout)

    assert released_mb("listen") > 150  # MB of the freed 256 MiB block, less the compiler's.
    assert released_mb("off") < 0  # The compiler's memory comes on top.

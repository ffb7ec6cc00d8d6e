"""Host memory policy for XLA:CPU: reuse freed buffers instead of page-faulting fresh ones.

XLA:CPU allocates each call's temporary buffer with malloc (569 MB for the `small` train step
at 32 x 128 tokens). glibc serves a block that large from its own mmap and unmaps it when it
is freed, so every step touches half a gigabyte of new pages: about 130k page faults and a
fifth of the step's time in the kernel. `reuse_freed_memory` makes glibc serve every block
from its one main heap and keep freed memory there (up to 2 GiB), so from the second step on
the buffer's pages are reused (measured: 620 -> 500 ms per `small` step, 130k -> 0 faults).
The cost: the process keeps its peak memory instead of giving it back.

It must run before JAX starts its CPU backend (its threads pick their malloc arena when they
start); the entry points (jif.train, jif.sample, bench, app, transfer) call it first thing.
Threads started earlier (numpy's BLAS pool starts one on import) may already own arenas that
JAX's threads then share, so a process that has to be sure starts with the same policy in
glibc's tunables instead (`child_env`, for the sweep's worker processes): glibc reads them
before any thread exists. In a process of one XLA thread the difference is large
(docs/bench.md, "Sweep throughput").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1  # keep up to this many free bytes at the top of the heap
M_MMAP_MAX = -4  # at most this many blocks served by their own mmap (0: none)
M_ARENA_MAX = -8  # at most this many arenas (1: every thread uses the main heap)
KEEP_FREE_BYTES = 2**31 - 1  # mallopt takes an int
_applied = False  # a fact about this process, like the malloc settings themselves


def reuse_freed_memory() -> bool:
    """Applies the policy above; True if it is in effect for JAX's threads. A no-op off
    Linux/glibc, and once JAX's backend is running (too late for its threads)."""
    global _applied
    if not sys.platform.startswith("linux") or _jax_backend_started():
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_FREE_BYTES))
    _applied = all(mallopt(param, value) == 1 for param, value in settings) or _applied
    return _applied


def child_env() -> dict[str, str]:
    """Environment variables that give a new process this policy from its start (glibc's
    tunables; ignored by other C libraries)."""
    tunables = {
        "glibc.malloc.arena_max": 1,
        "glibc.malloc.mmap_max": 0,
        "glibc.malloc.trim_threshold": KEEP_FREE_BYTES,
    }
    ours = ":".join(f"{k}={v}" for k, v in tunables.items())
    theirs = os.environ.get("GLIBC_TUNABLES")
    return {"GLIBC_TUNABLES": f"{theirs}:{ours}" if theirs else ours}


def applied() -> bool:
    """Whether `reuse_freed_memory` took effect in this process."""
    return _applied


def _jax_backend_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: assume the worst
        return True

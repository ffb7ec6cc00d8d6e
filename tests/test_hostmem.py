"""jif.hostmem: with the policy on, XLA:CPU's big per-call buffers stop page-faulting.

Counts minor page faults (getrusage) of a jitted function whose temporary buffers are larger
than glibc's largest mmap threshold (32 MiB), in fresh processes with and without the policy:
the fewest faults of one call after the first two (the heap grows while it settles).
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys
from jif import hostmem
applied = hostmem.reuse_freed_memory() if sys.argv[1] == "on" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.cumsum(x, 0) * x[::-1]))  # 64 MiB float32 temporaries
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
late = hostmem.reuse_freed_memory()  # the backend is running now: too late, a no-op
print(json.dumps({"applied": applied, "late": late, "faults": min(faults[2:])}))
"""


def _faults(mode: str) -> dict:
    # XLA's own optimisation level: the tests' conftest asks for its quickest compiles, whose
    # code runs this big cumulative sum about 5 times slower (the buffers are the same).
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "XLA_FLAGS": flags},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc policy")
def test_reused_buffers_do_not_page_fault():
    off, on = _faults("off"), _faults("on")
    if off["faults"] < 4096:  # 16 MiB of 4 KiB pages: this allocator does not show the problem
        pytest.skip(f"only {off['faults']:.0f} page faults per call without the policy")
    assert on["applied"] and not off["applied"]
    assert on["late"] == on["applied"]  # a late call reports the state, changes nothing
    assert on["faults"] < 0.05 * off["faults"], (on, off)

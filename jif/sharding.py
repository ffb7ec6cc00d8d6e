"""Device mesh ("data", "model") and sharding by named axis.

Parameters are sharded by their penzai axis names (tensor parallelism over MLP neurons,
attention heads and the vocabulary), batches over "data":

    "neurons", "heads", "kv_heads", "vocabulary" -> mesh axis "model"
    "batch"                                      -> mesh axis "data"

An axis whose size the mesh axis does not divide stays replicated. XLA's SPMD partitioner
propagates these shardings through the jitted train step.

Multi-host (TPU pod slice, GPU cluster): call `jax.distributed.initialize()` in every
process before anything else (`python -m jif.train --distributed ...`, or JIF_DISTRIBUTED=1);
the mesh then spans all processes' devices and every process runs the same command.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from penzai import pz
from penzai.toolshed import sharding_util

AXIS_RULES: dict[str, str] = {
    "neurons": "model",
    "heads": "model",
    "kv_heads": "model",
    "vocabulary": "model",
    "batch": "data",
}
"""Named array axis -> mesh axis."""


def parse_mesh(spec: str) -> tuple[int, int]:
    """ "DxM" -> (D, M), e.g. "4x2" -> data 4, model 2."""
    try:
        d, m = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"--mesh {spec!r} is not DxM (data x model), e.g. --mesh 4x2") from None
    if d < 1 or m < 1:
        raise ValueError(f"--mesh {spec!r}: both sizes must be >= 1")
    return d, m


def make_mesh(spec: str | None) -> jax.sharding.Mesh | None:
    """A ("data", "model") mesh over the first D*M devices; None for spec None or ""."""
    if not spec:
        return None
    d, m = parse_mesh(spec)
    devices = jax.devices()
    if d * m > len(devices):
        raise ValueError(
            f"--mesh {spec} needs {d * m} devices but only {len(devices)} are visible "
            f"({devices[0].platform}). On CPU, set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={d * m} to test."
        )
    grid = np.asarray(devices[: d * m]).reshape(d, m)
    return jax.sharding.Mesh(grid, ("data", "model"))


def _leaf_sharding(leaf, mesh: jax.sharding.Mesh):
    """Sharding for one leaf: NamedArrays by axis name (divisible axes only), others
    replicated."""
    if isinstance(leaf, pz.nx.NamedArray | pz.nx.NamedArrayView):
        rules = {
            name: mesh_axis
            for name, mesh_axis in AXIS_RULES.items()
            if name in leaf.named_shape and leaf.named_shape[name] % mesh.shape[mesh_axis] == 0
        }
        return sharding_util.name_to_name_sharding(leaf, mesh, rules)
    return NamedSharding(mesh, PartitionSpec())


def tree_shardings(tree, mesh: jax.sharding.Mesh):
    """Shardings for a pytree that may mix NamedArrays (sharded by name) and plain arrays
    (replicated): a pytree of the same structure, usable as jit in/out shardings."""
    return jax.tree_util.tree_map(
        lambda x: _leaf_sharding(x, mesh), tree, is_leaf=pz.nx.is_namedarray
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """int32 [B, L] batches split over "data" along B."""
    return NamedSharding(mesh, PartitionSpec("data", None))


def put_batch(batch: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global batch (the same numpy array in every process) -> a sharded jax.Array.
    Each process only transfers the rows its devices hold."""
    if isinstance(sharding, NamedSharding):
        n = sharding.mesh.shape["data"]
        if batch.shape[0] % n:
            raise ValueError(
                f"batch size {batch.shape[0]} must be divisible by the mesh's data axis ({n})"
            )
    return jax.make_array_from_callback(batch.shape, sharding, lambda idx: batch[idx])


def describe(tree, mesh: jax.sharding.Mesh) -> dict[str, str]:
    """{label: partition spec} for a dict of NamedArrays (printed at start)."""
    out = {}
    for k, v in tree.items():
        s = _leaf_sharding(v, mesh)
        spec = s.data_array.spec if hasattr(s, "data_array") else s.spec
        out[k] = f"{dict(v.named_shape)} -> {tuple(spec)}"
    return out


def place_state(state: dict, mesh_spec: str | None, say=print) -> tuple[dict, dict, object]:
    """(state on its devices, its shardings, the batch sharding): over the mesh "DxM" (--mesh), or one device
    (batch sharding None: batches go to the default device as they are)."""
    mesh = make_mesh(mesh_spec)
    if jax.process_count() > 1 and (mesh is None or mesh.size != jax.device_count()):
        raise ValueError(
            f"{jax.process_count()} processes need a mesh over all devices: pass --mesh DxM "
            f"with D * M = {jax.device_count()} (got {mesh_spec or 'no --mesh'})."
        )
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.device_put(state, device), jax.tree_util.tree_map(lambda _: device, state), None
    shardings = tree_shardings(state, mesh)
    say("sharding: " + json.dumps(describe(state["params"], mesh), indent=1))
    return jax.device_put(state, shardings), shardings, batch_sharding(mesh)

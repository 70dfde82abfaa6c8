"""Devices: the data-parallel mesh, and moving batches and parameters on and off it.

Every process holds the whole sampled batch (sampling is replicated) and places the rows of its
own devices (:func:`shard_batch`); parameters and optimizer state are replicated
(:func:`replicate`) and read back from this process's copy (:func:`to_host`).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def fill_devices(rows: int, *, devices: int, microbatch: int | None) -> int:
    """``rows`` rounded up to fill every device's microbatches (more rows, never fewer)."""
    unit = devices * (microbatch or 1)
    return -(-rows // unit) * unit

def make_mesh(devices: Any = None) -> Mesh:
    """A one-axis data-parallel mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def shard_batch(mesh: Mesh, tokens: np.ndarray, mask: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Place this process's rows of the global batch on its devices.

    Every process holds the whole sampled batch (sampling is replicated) and contributes the rows
    of its own devices, so the global array is the same however many processes there are.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    rows = tokens.shape[0]
    if rows % mesh.devices.size:
        raise ValueError(f"physical batch ({rows}) must be a multiple of the device count "
                         f"({mesh.devices.size})")

    def place(array: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    return place(tokens), place(mask)


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Put every array of ``tree`` on every device of ``mesh`` (works across processes)."""
    sharding = NamedSharding(mesh, P())

    def place(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array | np.ndarray):
            return leaf
        host = np.asarray(leaf) if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable \
            else np.asarray(leaf.addressable_data(0))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(place, tree)


def to_host(tree: Any) -> Any:
    """Copy a replicated pytree to numpy (reads this process's copy; valid on any process)."""
    def fetch(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return np.asarray(leaf.addressable_data(0))
        return leaf
    return jax.tree_util.tree_map(fetch, tree)

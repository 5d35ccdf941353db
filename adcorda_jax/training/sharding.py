"""Data-parallel placement with `jax.sharding`: a 1-D mesh over every device, batch split along it.

Parameters are replicated, batches are sharded along their leading axis; XLA inserts the gradient
all-reduce. The same code runs on 1 CPU, 4 fake CPU devices, a GPU box or a multi-host TPU slice.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from adcorda_jax.errors import ConfigError

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  """A 1-D mesh named `data` over all devices of all processes.

  The axis is `Auto` (compiler-propagated shardings): model code stays sharding-agnostic, and XLA
  inserts the gradient all-reduce. (`jax.make_mesh` defaults to `Explicit` axes since JAX 0.7.)
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_divisible(batch_size: int, config_key: str, mesh: Mesh) -> None:
  """A global batch must split evenly over the devices (and processes)."""
  devices = mesh.devices.size
  if batch_size % devices:
    raise ConfigError(
        f"{config_key}={batch_size} cannot be split over {devices} devices; "
        f"use a multiple of {devices}")


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a global host batch on the mesh, each process contributing its own rows."""
  sharding = batch_sharded(mesh)
  count, index = jax.process_count(), jax.process_index()
  placed = {}
  for name, array in batch.items():
    rows = array.shape[0] // count
    local = array[index * rows:(index + 1) * rows]
    placed[name] = jax.make_array_from_process_local_data(sharding, local, array.shape)
  return placed


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` on all devices of the mesh.

  With several processes each one places its own copy on its own devices (every process holds
  the same value: from the same seed, checkpoint or computation); `jax.device_put` refuses a
  committed array (one already on a device) for devices of other processes.
  """
  target = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, target)
  return jax.tree.map(lambda leaf: _replicate_leaf(leaf, target), tree)


def _replicate_leaf(leaf: Any, target: NamedSharding) -> jax.Array:
  if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    data = _replicate_leaf(jax.random.key_data(leaf), target)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if leaf.sharding.is_equivalent_to(target, leaf.ndim):
      return leaf
    return jax.jit(_identity, out_shardings=target)(leaf)  # Gathered by XLA.
  host = np.asarray(leaf)
  host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)  # As device_put.
  return jax.make_array_from_callback(host.shape, target, lambda index: host[index])


def _identity(x: Any) -> Any:
  return x

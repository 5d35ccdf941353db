"""Training batches for every loop: a device-resident split gathered by index, or prefetched.

Training batch `step` is always `batches.train_batch_indices(n, batch_size, step, seed)` of the
split, so both placements give exactly the batches of a host-sliced loop:

- `device`: the split is copied once to every device of the mesh (one replica per device, so any
  example can land in any device's shard of a batch without cross-device traffic), and each batch
  is a jitted gather by index: per step only the int32 indices cross from the host.
- `host`: the batch is sliced from host numpy and transferred, and the next step's batch is
  prepared and transferred in a background thread while the current step runs (double buffer).

`auto` (the default) keeps the split on the devices when one replica fits in
`device_memory_fraction` of the smallest device's memory (host RAM for the CPU backend), on
every process of a multi-process run (they agree, or all use the host).
Settings: `data.placement` and `data.device_memory_fraction`; they do not change any result.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from adcorda_jax import config_checks
from adcorda_jax.training import batches, sharding

PLACEMENTS = ("auto", "device", "host")


@dataclasses.dataclass(frozen=True)
class InputSettings:
  """Where training splits live: `placement` auto|device|host, and the memory share for auto."""
  placement: str = "auto"
  device_memory_fraction: float = 0.25


def settings_from_config(config: ml_collections.ConfigDict) -> InputSettings:
  """`data.placement` and `data.device_memory_fraction` (one-line errors naming the key)."""
  data = config.get("data") or ml_collections.ConfigDict()
  placement = config_checks.one_of(data, "placement", "data", PLACEMENTS, default="auto")
  fraction = config_checks.fraction(data, "device_memory_fraction", "data", default=0.25,
                                   allow_one=True)
  return InputSettings(placement, fraction)


def device_memory_bytes(device: jax.Device) -> int | None:
  """The memory of `device` in bytes: its allocator limit, host RAM for CPUs, None if unknown."""
  try:
    stats = device.memory_stats()
  except Exception:  # Backends without memory stats.  # pylint: disable=broad-except
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
      return None
  return None


def resolve_placement(arrays: Mapping[str, np.ndarray], mesh: Mesh,
                      settings: InputSettings) -> str:
  """'device' or 'host' for a split of `arrays` under `settings` (see the module docstring)."""
  if settings.placement != "auto":
    return settings.placement
  needed = sum(np.asarray(a).nbytes for a in arrays.values())
  limits = [device_memory_bytes(d) for d in mesh.devices.flat if d.process_index ==
            jax.process_index()]
  fits = bool(limits) and all(limit is not None for limit in limits) and (
      needed <= settings.device_memory_fraction * min(limits))
  if jax.process_count() > 1:  # One answer for all processes (hosts may differ in memory).
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    fits = bool(np.all(multihost_utils.process_allgather(np.int32(fits))))
  return "device" if fits else "host"


@functools.partial(jax.jit, static_argnums=2)
def _gather(data: dict[str, jax.Array], indices: jax.Array, sharded: Any
            ) -> dict[str, jax.Array]:
  return jax.tree.map(lambda array: jax.lax.with_sharding_constraint(array[indices], sharded),
                      data)


class BatchStream:
  """`stream(step)`: training batch `step` of a split, on the mesh ({name: batch-sharded array}).

  Build one per split and loop, call `close()` when done (it stops the prefetch thread). The
  batches are those of `train_batch_indices(len, batch_size, step, seed)` whatever the placement.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int, mesh: Mesh,
               settings: InputSettings = InputSettings(), *, name: str = "train"):
    self.arrays = {key: np.asarray(value) for key, value in arrays.items()}
    lengths = {len(value) for value in self.arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"arrays of a split must have one length, got {sorted(lengths)}")
    self.num_examples, = lengths
    self.batch_size, self.seed, self.mesh = batch_size, seed, mesh
    self.placement = resolve_placement(self.arrays, mesh, settings)
    self._resident = None
    self._executor = None
    self._pending: tuple[int, concurrent.futures.Future] | None = None
    size_mb = sum(a.nbytes for a in self.arrays.values()) / 2 ** 20
    if self.placement == "device":
      self._resident = sharding.replicate(self.arrays, mesh)
      logging.info("Input %s: %.1f MB kept on the %d device(s), batches gathered by index.",
                   name, size_mb, mesh.devices.size)
    else:
      self._executor = concurrent.futures.ThreadPoolExecutor(
          max_workers=1, thread_name_prefix=f"prefetch-{name}")
      logging.info("Input %s: %.1f MB on the host, next batch prefetched.", name, size_mb)

  def indices(self, step: int) -> np.ndarray:
    return batches.train_batch_indices(self.num_examples, self.batch_size, step, self.seed)

  def _host_batch(self, step: int) -> dict[str, jax.Array]:
    indices = self.indices(step)
    return sharding.put_batch({k: v[indices] for k, v in self.arrays.items()}, self.mesh)

  def __call__(self, step: int) -> dict[str, jax.Array]:
    if self._resident is not None:
      placed = sharding.put_batch({"index": self.indices(step).astype(np.int32)}, self.mesh)
      return _gather(self._resident, placed["index"], sharding.batch_sharded(self.mesh))
    pending, self._pending = self._pending, None
    if pending is not None and pending[0] == step:
      batch = pending[1].result()
    else:
      if pending is not None:
        pending[1].cancel()
      batch = self._host_batch(step)
    self._pending = (step + 1, self._executor.submit(self._host_batch, step + 1))
    return batch

  def close(self) -> None:
    """Stops prefetching (the resident copy is freed with the stream)."""
    if self._executor is not None:
      if self._pending is not None:
        self._pending[1].cancel()
        self._pending = None
      self._executor.shutdown(wait=True)

  def __enter__(self) -> BatchStream:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

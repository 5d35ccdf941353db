"""What a saved artifact depends on: flat fingerprints, their differences, content digests.

A fingerprint is a JSON-safe dict of dotted config keys (`correct.eps`) and content digests of
inputs (`baseline.params_sha1`). Every "was this folder made by the same settings?" check in the
project compares two fingerprints with `differences` and words a mismatch with `mismatch_error`,
so a changed config is reported the same way by a run, a stage and an attack.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import jax
import ml_collections
import numpy as np

from adcorda_jax import workdir as workdir_lib
from adcorda_jax.errors import AdcordaError, CheckpointError

# Fields that may change between a run and its resumption without invalidating artifacts:
# logging and checkpoint cadence, and how the machine is split into devices and processes (each
# process of a multi-process run has its own process_id; a rerun may use another port).
RESUMABLE_KEYS = frozenset({
    "train.log_every_steps", "train.max_checkpoints", "distributed", "cpu_devices",
    "coordinator_address", "num_processes", "process_id", "distributed_timeout_seconds",
    "adapt.log_every_steps", "adapt.max_checkpoints", "adapt.checkpoint_every_steps",
    "data.placement", "data.device_memory_fraction"})
# Config keys added after runs were first saved, with the default that reproduces those runs: a
# record without the key equals a config holding that default, so saved runs still resume.
ADDED_AT_DEFAULT = {"train.compute_dtype": "float32", "adapt.direction": "forward",
                    "adapt.source": "corrected_set", "adapt.start": "baseline"}


def normalized(tree: Any) -> Any:
  """`tree` as it reads back from JSON (tuples become lists, numpy scalars Python numbers)."""
  return json.loads(json.dumps(tree, default=workdir_lib.json_default))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted key: leaf} of nested dicts; keys that are already dotted stay as they are."""
  if isinstance(tree, dict):
    flat: dict[str, Any] = {}
    for key, value in tree.items():
      flat.update(flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: tree}


def differences(old: dict[str, Any], new: dict[str, Any],
                ignore: Iterable[str] = ()) -> list[str]:
  """The sorted dotted keys whose (JSON-normalized) values differ, excluding `ignore`."""
  ignore = frozenset(ignore)
  old_flat, new_flat = flatten(normalized(old)), flatten(normalized(new))
  for key, default in ADDED_AT_DEFAULT.items():
    for flat in (old_flat, new_flat):
      if key not in flat and any(k.startswith(key.split(".")[0] + ".") for k in flat):
        flat[key] = default
  return sorted(k for k in set(old_flat) | set(new_flat)
                if k not in ignore and old_flat.get(k) != new_flat.get(k))


def shown(keys: list[str], limit: int = 5) -> str:
  """The first `limit` keys, comma-separated, for a one-line message."""
  return ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "")


def mismatch_error(what: str, changed: list[str], remedy: str,
                   error: type[AdcordaError] = CheckpointError) -> AdcordaError:
  """The one wording of "this folder was made with a different config"."""
  return error(f"{what} was made with a different config (differs at: {shown(changed)}); "
               f"{remedy}")


def config_keys(config: ml_collections.ConfigDict, sections: Iterable[str],
                ignore: Iterable[str] = RESUMABLE_KEYS) -> dict[str, Any]:
  """The flat {dotted key: value} of the named top-level fields/sections of `config`."""
  plain = workdir_lib.config_to_dict(config)
  ignore = frozenset(ignore)
  flat: dict[str, Any] = {}
  for name in sections:
    flat.update({k: v for k, v in flatten({name: plain.get(name)}).items() if k not in ignore})
  return flat


def tree_digest(tree: Any) -> str:
  """A SHA-1 of a pytree of arrays (paths, shapes, dtypes and bytes): model parameters."""
  digest = hashlib.sha1()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  for path, leaf in leaves:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}{array.shape}{array.dtype.str}".encode())
    digest.update(memoryview(array).cast("B"))
  return digest.hexdigest()


def arrays_digest(*arrays: np.ndarray) -> str:
  """A SHA-1 of a sequence of arrays (shapes, dtypes and bytes): attacked examples.

  Kept separate from `tree_digest` because saved attack runs and corrected sets record it.
  """
  digest = hashlib.sha1()
  for array in arrays:
    array = np.ascontiguousarray(array)
    digest.update(str((array.shape, array.dtype.str)).encode())
    digest.update(memoryview(array).cast("B"))
  return digest.hexdigest()

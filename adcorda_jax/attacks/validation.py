"""Host-side argument checks for the public attack functions.

Each check raises a one-line `ConfigError` naming the argument and the bad value, before anything
is compiled. Values that are traced (an attack called under `jit`/`vmap`, as
`robust_accuracy_curve` does) cannot be inspected and are left to the caller, which validates
them concretely before tracing.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from adcorda_jax.attacks import norms
from adcorda_jax.attacks.losses import LogitsFn
from adcorda_jax.errors import ConfigError


def is_traced(value: Any) -> bool:
  """Whether `value` is an abstract tracer (its entries are unknown on the host)."""
  return isinstance(value, jax.core.Tracer)


def check_norm(value: Any) -> None:
  """`value` must name a supported norm."""
  if not isinstance(value, str) or value not in norms.NORMS:
    raise ConfigError(f"norm={value!r} is not valid; choose one of: {', '.join(norms.NORMS)}")


def check_positive_int(value: Any, name: str) -> None:
  """`value` must be an integer > 0 (steps, restarts)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ConfigError(f"{name} must be an integer > 0, got {value!r}")


def _number_text(value: float) -> str:
  return repr(float(value))


def check_budget(value: Any, name: str, batch_size: int, allow_zero: bool) -> None:
  """`value` must be a finite scalar or [N] array, >= 0 (`allow_zero`) or > 0 everywhere."""
  if is_traced(value):
    return
  if isinstance(value, bool) or value is None:
    raise ConfigError(f"{name} must be a number or an array of shape ({batch_size},), "
                      f"got {value!r}")
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise ConfigError(f"{name} must be a number or an array of shape ({batch_size},), "
                      f"got {value!r}") from None
  if array.shape not in ((), (batch_size,)):
    raise ConfigError(f"{name} must be a scalar or have shape ({batch_size},), "
                      f"got shape {array.shape}")
  if not np.all(np.isfinite(array)):
    bad = array[~np.isfinite(array)].ravel()[0]
    raise ConfigError(f"{name} must be finite, got {_number_text(bad)}")
  lowest = float(array.min(initial=np.inf))
  if lowest < 0 or (lowest == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ConfigError(f"{name} must be {bound}, got {_number_text(lowest)}")


def check_unit_interval(value: Any, name: str) -> None:
  """`value` must be a number in (0, 1] (APGD's rho and momentum)."""
  if is_traced(value):
    return
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.floating))
      or not math.isfinite(value) or not 0 < value <= 1):
    raise ConfigError(f"{name} must be a number in (0, 1], got {value!r}")


def check_images(x: Any) -> None:
  """`x` must be a float batch [N, ...] with finite values in [0, 1]."""
  shape = np.shape(x)
  if len(shape) < 2 or shape[0] == 0:
    raise ConfigError(f"x must be a non-empty batch [N, ...], got shape {shape}")
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  if not np.issubdtype(dtype, np.floating):
    raise ConfigError(f"x must be float images in [0, 1], got dtype {dtype}")
  if is_traced(x):
    return
  array = np.asarray(x)
  if not np.all(np.isfinite(array)):
    raise ConfigError("x must be finite, got NaN or infinite values")
  low, high = float(array.min()), float(array.max())
  if low < 0 or high > 1:
    raise ConfigError(f"x must lie in [0, 1], got values in [{low!r}, {high!r}]")


def check_labels(values: Any, batch_size: int, num_classes: int) -> None:
  """`values` must be integer labels [N] in [0, num_classes)."""
  shape = np.shape(values)
  if shape != (batch_size,):
    raise ConfigError(f"labels must have shape ({batch_size},) to match x, got shape {shape}")
  dtype = values.dtype if hasattr(values, "dtype") else np.asarray(values).dtype
  if not np.issubdtype(dtype, np.integer):
    raise ConfigError(f"labels must be integers, got dtype {dtype}")
  if is_traced(values):
    return
  array = np.asarray(values)
  outside = array[(array < 0) | (array >= num_classes)]
  if outside.size:
    raise ConfigError(
        f"labels must be in [0, {num_classes}), got {int(outside[0])}")


def check_key(value: Any, required: bool, reason: str = "") -> None:
  """`value` must be a PRNG key when the attack draws random starts (`reason` says why)."""
  if value is None and required:
    raise ConfigError(f"key must be a PRNG key (e.g. jax.random.key(0)){reason}, got None")


def num_classes(logits_fn: LogitsFn, params: Any, x: Any) -> int:
  """Number of classes of `logits_fn`, read from its output shape without running it."""
  return int(jax.eval_shape(logits_fn, params, x[:1]).shape[-1])


def check_attack_inputs(logits_fn: LogitsFn, params: Any, x: Any, labels: Any, *, eps: Any,
                        norm: str) -> None:
  """The checks shared by every attack: images, labels, eps and norm."""
  check_norm(norm)
  check_images(x)
  batch_size = np.shape(x)[0]
  check_labels(labels, batch_size, num_classes(logits_fn, params, x))
  check_budget(eps, "eps", batch_size, allow_zero=True)


def check_eps_grid(value: Any) -> np.ndarray:
  """`value` must be a non-empty 1-D sequence of finite budgets >= 0; returns it as float32."""
  grid = np.asarray(value, dtype=np.float64) if not isinstance(value, str) else np.array([])
  if grid.ndim != 1 or grid.size == 0:
    raise ConfigError(f"eps_grid must be a non-empty 1-D sequence, got shape {grid.shape}")
  check_budget(grid, "eps_grid", grid.size, allow_zero=True)
  return grid.astype(np.float32)

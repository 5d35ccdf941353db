"""Which parameters a fine-tuning run may change, selected by a regex over parameter paths.

A parameter's path is its keys joined by '/', e.g. `stage3_block2/conv2/kernel` or
`classifier/bias`. It trains iff `re.search(pattern, path)` matches; "" and ".*" train everything.
Frozen parameters get exactly zero updates (no weight decay either) via `optax.set_to_zero`.

Only `params` are covered: BatchNorm running statistics of frozen layers still move whenever the
model runs with train=True; run frozen BatchNorm layers in eval mode to keep them fixed.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import optax

from adcorda_jax.errors import ConfigError

CONFIG_KEY = "adapt.trainable"
TRAIN, FREEZE = "train", "freeze"
_EXAMPLES_SHOWN = 4


def param_paths(params: Any) -> list[str]:
  """The '/'-joined path of every leaf of `params`, in leaf order."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]


def _compile(pattern: Any) -> re.Pattern[str]:
  if not isinstance(pattern, str):
    raise ConfigError(f"{CONFIG_KEY} must be a regular expression string, got {pattern!r}")
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"{CONFIG_KEY}={pattern!r} is not a valid regular expression: {e}") from None


def trainable_mask(params: Any, pattern: str) -> Any:
  """A pytree like `params` of bools: True where the path matches `pattern` (re.search).

  Raises a one-line ConfigError when the pattern is invalid or matches no parameter.
  """
  regex = _compile(pattern)
  paths = param_paths(params)
  flags = [regex.search(path) is not None for path in paths]
  if paths and not any(flags):
    # Spread over the (sorted) paths, so the examples show different modules.
    picks = sorted({round(i * (len(paths) - 1) / max(_EXAMPLES_SHOWN - 1, 1))
                    for i in range(min(_EXAMPLES_SHOWN, len(paths)))})
    examples = ", ".join(paths[i] for i in picks) + (" ..." if len(paths) > len(picks) else "")
    raise ConfigError(f"{CONFIG_KEY}={pattern!r} matches no parameter; paths look like: "
                      f"{examples}")
  return jax.tree.unflatten(jax.tree.structure(params), flags)


def masked_optimizer(tx: optax.GradientTransformation, params: Any,
                     pattern: str) -> optax.GradientTransformation:
  """`tx` for the parameters matching `pattern`; zero updates for the rest.

  The inner `tx` only sees (and keeps state for) the trainable parameters, so frozen ones get no
  momentum, Adam moments or weight decay at all.
  """
  mask = trainable_mask(params, pattern)
  labels = jax.tree.map(lambda trains: TRAIN if trains else FREEZE, mask)
  return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)

"""Validation helpers for config fields.

Each check raises a one-line `ConfigError` naming the full config key (e.g. `train.batch_size`)
and the bad value, so a typo in a command-line override is reported before any work starts.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import ml_collections

from adcorda_jax.errors import ConfigError


def _value(config: ml_collections.ConfigDict, key: str, default: Any) -> Any:
  return config.get(key, default) if default is not None else config[key]


def positive_int(config: ml_collections.ConfigDict, key: str, prefix: str,
                 default: int | None = None, allow_zero: bool = False) -> int:
  """Returns `config[key]` if it is an int > 0 (or >= 0 with `allow_zero`)."""
  value = _value(config, key, default)
  lowest = 0 if allow_zero else 1
  if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
    bound = ">= 0" if allow_zero else "> 0"
    raise ConfigError(f"{prefix}.{key} must be an integer {bound}, got {value!r}")
  return value


def positive_float(config: ml_collections.ConfigDict, key: str, prefix: str,
                   default: float | None = None, allow_zero: bool = False) -> float:
  """Returns `config[key]` as a float if it is finite and > 0 (or >= 0 with `allow_zero`)."""
  value = _value(config, key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ConfigError(f"{prefix}.{key} must be a finite number, got {value!r}")
  if value < 0 or (value == 0 and not allow_zero):
    bound = ">= 0" if allow_zero else "> 0"
    raise ConfigError(f"{prefix}.{key} must be {bound}, got {value!r}")
  return float(value)


def fraction(config: ml_collections.ConfigDict, key: str, prefix: str,
             default: float | None = None, allow_one: bool = False) -> float:
  """Returns `config[key]` if it lies in [0, 1) (or [0, 1] with `allow_one`)."""
  value = positive_float(config, key, prefix, default, allow_zero=True)
  if value > 1 or (value == 1 and not allow_one):
    upper = "1]" if allow_one else "1)"
    raise ConfigError(f"{prefix}.{key} must be in [0, {upper}, got {value!r}")
  return value


def unit_fraction(config: ml_collections.ConfigDict, key: str, prefix: str,
                  default: float | None = None) -> float:
  """Returns `config[key]` if it lies in (0, 1] (a step factor, momentum or share that must act)."""
  value = positive_float(config, key, prefix, default)
  if value > 1:
    raise ConfigError(f"{prefix}.{key} must be in (0, 1], got {value!r}")
  return value


def one_of(config: ml_collections.ConfigDict, key: str, prefix: str, choices: Sequence[str],
           default: str | None = None) -> str:
  """Returns `config[key]` if it is one of `choices`."""
  value = _value(config, key, default)
  if value not in choices:
    raise ConfigError(
        f"{prefix}.{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
  return value

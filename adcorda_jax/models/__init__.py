"""Image classifiers chosen by name from the config.

    model = create_model(config.model, num_classes=10, mean=(0.286,), std=(0.353,))
    variables = model.init(rng, images)                       # {'params', 'batch_stats'}
    logits = model.apply(variables, images)                   # images: float NHWC in [0, 1]
    logits, features = model.apply(variables, images, return_features=True)
    logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': rng})
    model_channels('resnet20', config.model)                 # widths filter pruning can shrink

Models normalize their inputs themselves, so attacks can perturb pixels directly, and return the
penultimate features on request for feature-level losses (Deep CORAL, distillation).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from adcorda_jax import config_checks
from adcorda_jax.errors import ConfigError
# Importing the model modules registers them.
from adcorda_jax.models import resnet_cifar, resnet_imagenet, small_cnn  # noqa: F401
from adcorda_jax.models.common import MODELS

__all__ = ["MODELS", "create_model", "count_params", "model_channels"]

CHANNELS_KEY = "model.channels"


def _constants(values: Sequence[float], label: str, positive: bool) -> tuple[float, ...]:
  """Validates per-channel normalization constants (they come from the dataset, not the user)."""
  constants = tuple(float(v) for v in np.ravel(np.asarray(values, dtype=np.float64)))
  if not constants or not all(math.isfinite(v) for v in constants):
    raise ValueError(f"{label} must be a non-empty sequence of finite numbers, got {values!r}")
  if positive and min(constants) <= 0:
    raise ValueError(f"{label} values must be > 0, got {values!r}")
  return constants


def _channels(value: Any, expected: int, name: str) -> tuple[int, ...]:
  """Validates `model.channels`: empty/None, or exactly `expected` positive integers."""
  if value is None:
    return ()
  ints = isinstance(value, (tuple, list)) and all(
      isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) and v > 0
      for v in value)
  if not ints or len(value) not in (0, expected):
    raise ConfigError(
        f"{CHANNELS_KEY} must be empty (default widths) or {expected} positive integers for "
        f"{name} (one per prunable conv), got {value!r}")
  return tuple(int(v) for v in value)


def create_model(model_config: ml_collections.ConfigDict | Mapping[str, Any], num_classes: int,
                 mean: Sequence[float], std: Sequence[float]) -> nn.Module:
  """Builds the model named `model_config.name`, validating the config fields it reads.

  Args:
    model_config: the `model` config section (or a plain dict): `name`, `width` (channel
      multiplier > 0, default 1.0), `dropout` (in [0, 1), default 0.0; only small_cnn has a
      dropout layer) and `channels` (optional widths of the prunable convs, see
      `model_channels`; empty = the defaults at `width`).
    num_classes: number of output logits, >= 2.
    mean, std: per-channel (or single) constants; the model computes (x - mean) / std.
  Returns:
    An unbound flax module whose `__call__(x, train=False, return_features=False)` maps float
    NHWC images in [0, 1] to float32 logits [N, num_classes] (and features [N, D]).
  Raises:
    ConfigError: a field has an invalid value; the message names it (e.g. `model.width`).
  """
  name = model_config.get("name", None)
  if not isinstance(name, str):
    raise ConfigError(
        f"model.name must be one of: {', '.join(MODELS.names())}; got {name!r}")
  builder = MODELS.get(name, "model.name")
  width = config_checks.positive_float(model_config, "width", "model", default=1.0)
  dropout = config_checks.fraction(model_config, "dropout", "model", default=0.0)
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 2:
    raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  model = builder(num_classes=int(num_classes), width=width, dropout=dropout,
                  mean=_constants(mean, "mean", positive=False),
                  std=_constants(std, "std", positive=True))
  channels = _channels(model_config.get("channels", ()), len(model.default_channels()), name)
  return model.clone(channels=channels) if channels else model


def model_channels(model_name: str,
                   model_config: ml_collections.ConfigDict | Mapping[str, Any]) -> tuple[int, ...]:
  """The widths of the prunable convs of `model_name` under `model_config` (validated).

  small_cnn: conv1..conv4 outputs; ResNets: every basic block's conv1 output (inner width), in
  order stage1_block0, stage1_block1, ... The `model.channels` override if set, else the defaults
  at `model.width`. `l1_filter_prune` shrinks this tuple.
  """
  fields = (model_config.to_dict() if isinstance(model_config, ml_collections.ConfigDict)
            else dict(model_config))
  fields.update(name=model_name, dropout=0.0)  # Dropout plays no part; skip its warning.
  return create_model(fields, 2, mean=(0.0,), std=(1.0,)).layer_channels()


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays (or of `jax.ShapeDtypeStruct`s from `eval_shape`).

  Pass `variables['params']` to count trainable parameters only (BN running statistics excluded).
  """
  return sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params))

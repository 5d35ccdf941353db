"""Image classifiers chosen by name from the config.

    model = create_model(config.model, num_classes=10, mean=(0.286,), std=(0.353,))
    variables = model.init(rng, images)                       # {'params', 'batch_stats'}
    logits = model.apply(variables, images)                   # images: float NHWC in [0, 1]
    logits, features = model.apply(variables, images, return_features=True)
    logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': rng})

Models normalize their inputs themselves, so attacks can perturb pixels directly, and return the
penultimate features on request for feature-level losses (Deep CORAL, distillation).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from adcorda_jax import config_checks
from adcorda_jax.errors import ConfigError
from adcorda_jax.models import resnet_cifar, resnet_imagenet, small_cnn  # Registers the models.
from adcorda_jax.models.common import MODELS

__all__ = ["MODELS", "create_model", "count_params"]


def _constants(values: Sequence[float], label: str, positive: bool) -> tuple[float, ...]:
  """Validates per-channel normalization constants (they come from the dataset, not the user)."""
  constants = tuple(float(v) for v in np.ravel(np.asarray(values, dtype=np.float64)))
  if not constants or not all(math.isfinite(v) for v in constants):
    raise ValueError(f"{label} must be a non-empty sequence of finite numbers, got {values!r}")
  if positive and min(constants) <= 0:
    raise ValueError(f"{label} values must be > 0, got {values!r}")
  return constants


def create_model(model_config: ml_collections.ConfigDict, num_classes: int,
                 mean: Sequence[float], std: Sequence[float]) -> nn.Module:
  """Builds the model named `model_config.name`, validating the config fields it reads.

  Args:
    model_config: the `model` config section: `name`, `width` (channel multiplier > 0, default
      1.0) and `dropout` (in [0, 1), default 0.0; only small_cnn has a dropout layer).
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
  return builder(num_classes=int(num_classes), width=width, dropout=dropout,
                 mean=_constants(mean, "mean", positive=False),
                 std=_constants(std, "std", positive=True))


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays (or of `jax.ShapeDtypeStruct`s from `eval_shape`).

  Pass `variables['params']` to count trainable parameters only (BN running statistics excluded).
  """
  return sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params))

"""Structured L1-norm filter pruning (Li et al. 2017): physically narrower networks.

Every prunable conv (small_cnn conv1..conv4, every ResNet block's conv1; see the models'
`prunable_convs`) loses the output filters with the smallest L1 norms, ranked on the unpruned
kernels of all layers (Li et al.'s "independent" strategy). The conv kernel, its
BatchNorm (scale, bias, running mean and var) and the next layer's input channels are cut to the
kept filters, in their original order, and the model config gets the new `channels`:

    new_config, new_variables = l1_filter_prune(config.model.to_dict(), variables, ratio=0.3)
    pruned = create_model(ml_collections.ConfigDict(new_config), num_classes, mean, std)
    logits = pruned.apply(new_variables, images)

Before fine-tuning the pruned network computes exactly what the original computes with the removed
channels zeroed at the next layer's input. Block outputs and shortcuts of ResNets keep their
widths, so residual sums always match.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from adcorda_jax.models import create_model
from adcorda_jax.models.common import PrunableConv

# floor(ratio * n) is taken with this slack, so 0.29 of 100 filters removes 29, not 28.
_FLOOR_SLACK = 1e-9


def _ratios(ratio: float | Sequence[float], num_layers: int) -> list[float]:
  """One validated ratio in [0, 1) per prunable layer."""
  if isinstance(ratio, (int, float, np.number)) and not isinstance(ratio, bool):
    ratios = [float(ratio)] * num_layers
  elif isinstance(ratio, Sequence) and not isinstance(ratio, str):
    if len(ratio) != num_layers:
      raise ValueError(
          f"pruning ratio needs one value per prunable layer ({num_layers}), got {len(ratio)}")
    ratios = list(ratio)
  else:
    raise ValueError(f"pruning ratio must be a number or a sequence of numbers, got {ratio!r}")
  for value in ratios:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
        or not 0 <= value < 1:
      raise ValueError(f"pruning ratio must be in [0, 1), got {value!r}")
  return [float(value) for value in ratios]


def filters_to_keep(kernel: Any, ratio: float) -> np.ndarray:
  """Sorted indices of the output filters (last axis) kept when `ratio` of them is removed.

  floor(ratio * n) filters with the smallest L1 norms go (at least one filter stays); ties are
  broken towards keeping the earlier filter.
  """
  kernel = np.asarray(kernel)
  filters = kernel.shape[-1]
  removed = min(math.floor(ratio * filters + _FLOOR_SLACK), filters - 1)
  norms = np.abs(kernel).reshape(-1, filters).sum(axis=0)
  order = np.argsort(-norms, kind="stable")
  return np.sort(order[:filters - removed])


def _cut_next_layer(kernel: np.ndarray, keep: np.ndarray, channels: int) -> np.ndarray:
  """Keeps input channels `keep` of a conv (HWIO) or a Dense over a flattened NHWC map."""
  if kernel.ndim == 4:
    return kernel[:, :, keep, :]
  if kernel.ndim == 2 and kernel.shape[0] % channels == 0:
    # Rows are ordered (h, w, c): group them by position, keep the channels, flatten back.
    rows = kernel.reshape(-1, channels, kernel.shape[1])[:, keep, :]
    return rows.reshape(-1, kernel.shape[1])
  raise ValueError(f"cannot cut {channels} input channels from a kernel of shape {kernel.shape}")


def _layer(flat: dict[tuple[str, ...], Any], collection: str, path: str, name: str) -> tuple:
  key = (collection, *path.split("/"), name)
  if key not in flat:
    raise ValueError(f"variables have no {'/'.join(key)}; do they belong to this model?")
  return key


def l1_filter_prune(model_config: Mapping[str, Any] | ml_collections.ConfigDict,
                    variables: Mapping[str, Any], ratio: float | Sequence[float]
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Removes the `ratio` lowest-L1 output filters of every prunable conv.

  Args:
    model_config: the `model` config section the variables belong to (dict or ConfigDict).
    variables: {'params', 'batch_stats'} of that model.
    ratio: fraction of filters removed per layer, in [0, 1): one number for all layers or one per
      prunable layer (in `model_channels` order). floor(ratio * n) of n filters go.
  Returns:
    (new model config dict with `channels` set, new variables as nested dicts of jax arrays).
  Raises:
    ValueError: a ratio is outside [0, 1), or the variables do not match the config.
  """
  config = (model_config.to_dict() if isinstance(model_config, ml_collections.ConfigDict)
            else dict(model_config))
  model = create_model(dict(config, dropout=0.0), 2, mean=(0.0,), std=(1.0,))
  layers: tuple[PrunableConv, ...] = model.prunable_convs()
  channels = model.layer_channels()
  ratios = _ratios(ratio, len(layers))
  flat = {key: np.asarray(value) for key, value in traverse_util.flatten_dict(
      {collection: dict(tree) for collection, tree in variables.items()}).items()}
  kept = []
  for layer, width, layer_ratio in zip(layers, channels, ratios):
    kernel = flat[_layer(flat, "params", layer.conv, "kernel")]
    if kernel.shape[-1] != width:
      raise ValueError(f"{layer.conv} has {kernel.shape[-1]} filters but the config says "
                       f"{width}; pass the model config these variables belong to")
    # Ranked on the unpruned kernels: the "independent" strategy of Li et al.
    kept.append(filters_to_keep(kernel, layer_ratio))
  for layer, width, keep in zip(layers, channels, kept):
    kernel_key = _layer(flat, "params", layer.conv, "kernel")
    flat[kernel_key] = flat[kernel_key][..., keep]
    for collection, name in (("params", "scale"), ("params", "bias"),
                             ("batch_stats", "mean"), ("batch_stats", "var")):
      key = _layer(flat, collection, layer.bn, name)
      flat[key] = flat[key][keep]
    next_key = _layer(flat, "params", layer.next_layer, "kernel")
    flat[next_key] = _cut_next_layer(flat[next_key], keep, width)
  config["channels"] = tuple(len(keep) for keep in kept)
  return config, jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))

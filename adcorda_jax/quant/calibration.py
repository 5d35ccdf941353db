"""Post-training calibration: the quantization grid of every kernel and every layer input.

Methods (config key `model.quant.calibration`):

* `minmax`: the full range of the tensor; nothing is clipped, outliers stretch the grid.
* `percentile`: the p-th percentile of |x| (symmetric) or the (100 - p)-th / p-th percentiles of x
  (asymmetric); a few outliers are clipped so the bulk of the values gets a finer grid.
* `mse`: grid search over clipping ratios r in [0.2, 1] of the min-max range, keeping per tensor
  (or channel) the r with the smallest quantization MSE. r = 1 is a candidate, so its error is
  never above min-max's. Vectorized over channels; `lax.map` runs over the candidates, so memory
  stays at one copy of the tensor.

Weights are calibrated from the parameters alone; activations by running the float model on a few
calibration batches with a flax method interceptor that sees the input of every Conv/Dense call.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adcorda_jax.errors import ConfigError
from adcorda_jax.quant.fake_quant import (CALIBRATION_KEY, QuantSpec, ScaleZeroPoint, dequantize,
                                          is_kernel, path_string, quant_range, quantize,
                                          reduction_axes, scale_from_range, statistic_range)

CALIBRATION_METHODS = ("minmax", "percentile", "mse")
MSE_CANDIDATES = 100
MSE_MIN_RATIO = 0.2
# Layers whose inputs the activation calibration (and activation fake quantization) covers.
QUANTIZED_LAYERS = (nn.Conv, nn.Dense)


def check_method(method: Any) -> str:
  """Returns `method` if it is a known calibration method, else a one-line ConfigError."""
  if method not in CALIBRATION_METHODS:
    raise ConfigError(f"{CALIBRATION_KEY}={method!r} is not valid; choose one of: "
                      f"{', '.join(CALIBRATION_METHODS)}")
  return method


def mse_range(x: jax.Array, spec: QuantSpec, channel_axis: int = -1,
              num_candidates: int = MSE_CANDIDATES, min_ratio: float = MSE_MIN_RATIO
              ) -> tuple[jax.Array, jax.Array]:
  """(low, high): the min-max range shrunk by the ratio with the least quantize-dequantize MSE.

  Candidates run from 1.0 down to `min_ratio`, so ties keep the widest (least clipping) range.
  """
  x = jnp.asarray(x, jnp.float32)
  low, high = statistic_range(x, spec, channel_axis, "minmax")
  axes = reduction_axes(x.ndim, spec, channel_axis)
  qmin, qmax = quant_range(spec.bits, spec.symmetric)
  ratios = jnp.linspace(1.0, min_ratio, num_candidates, dtype=jnp.float32)

  def error(ratio: jax.Array) -> jax.Array:
    scale, zero_point = scale_from_range(low * ratio, high * ratio, spec)
    restored = dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)
    return jnp.mean(jnp.square(restored - x), axis=axes, keepdims=True)

  errors = jax.lax.map(error, ratios)  # [num_candidates, *range shape]
  best = ratios[jnp.argmin(errors, axis=0)]
  return low * best, high * best


def calibration_range(x: jax.Array, spec: QuantSpec, method: str = "minmax",
                      channel_axis: int = -1, percentile: float = 99.99
                      ) -> tuple[jax.Array, jax.Array]:
  """(low, high) of `x` per tensor or channel by `method`, keepdims to broadcast against `x`."""
  if check_method(method) == "mse":
    return mse_range(x, spec, channel_axis)
  return statistic_range(x, spec, channel_axis, method, percentile)


@functools.partial(jax.jit, static_argnames=("spec", "method", "channel_axis", "percentile"))
def calibrate_tensor(x: jax.Array, spec: QuantSpec, method: str = "minmax",
                     channel_axis: int = -1, percentile: float = 99.99) -> ScaleZeroPoint:
  """Scale and zero point of one tensor by `method` (one per output channel when per-channel)."""
  low, high = calibration_range(x, spec, method, channel_axis, percentile)
  return scale_from_range(low, high, spec)


def calibrate_weights(params: Any, spec: QuantSpec, method: str = "minmax",
                      percentile: float = 99.99) -> dict[str, ScaleZeroPoint]:
  """{kernel path: (scale, zero_point)} for every `kernel` leaf with ndim >= 2.

  Paths are '/'-joined (e.g. `stage1_block0/conv1/kernel`); per-channel scales are per output
  channel (the last kernel axis). Biases, BatchNorm parameters and statistics stay float.
  """
  check_method(method)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_string(path): calibrate_tensor(leaf, spec, method, -1, percentile)
          for path, leaf in leaves if is_kernel(path, leaf)}


def module_path(module: nn.Module) -> str:
  """The '/'-joined scope path of a bound module, e.g. `stage1_block0/conv1`."""
  return "/".join(module.path)


def _images(batch: Any) -> np.ndarray | jax.Array:
  """The images of a batch: an array, or a {'image', optional 'mask'} dict (padding dropped)."""
  if not isinstance(batch, Mapping):
    return batch
  images = batch["image"]
  if "mask" in batch:
    images = np.asarray(images)[np.asarray(batch["mask"]) > 0]
  return images


def _input_ranges_fn(model: nn.Module, spec: QuantSpec, method: str, percentile: float):
  """A jitted `(variables, x) -> {layer path: (low, high)}` of every Conv/Dense input."""
  @jax.jit
  def input_ranges(variables: Any, x: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    ranges: dict[str, tuple[jax.Array, jax.Array]] = {}

    def record(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and isinstance(context.module, QUANTIZED_LAYERS) \
          and args:
        path = module_path(context.module)
        low, high = calibration_range(args[0], spec, method, -1, percentile)
        if path in ranges:  # A layer called twice: cover both inputs.
          low, high = jnp.minimum(low, ranges[path][0]), jnp.maximum(high, ranges[path][1])
        ranges[path] = (low, high)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      model.apply(variables, x, train=False)
    return ranges

  return input_ranges


def calibrate_activations(model: nn.Module, variables: Any, batches: Iterable[Any],
                          spec: QuantSpec, method: str = "minmax", percentile: float = 99.99
                          ) -> dict[str, ScaleZeroPoint]:
  """{layer path: (scale, zero_point)} for the input of every nn.Conv / nn.Dense call.

  Runs `model` in eval mode on each batch (an image array or a {'image', 'mask'} dict). `minmax`
  keeps the extremes over all batches; `percentile` and `mse` average the per-batch ranges (the
  usual cheap estimate of a statistic of the pooled data). Layer paths are module scope paths
  such as `conv1` or `stage2_block0/shortcut_conv`.
  """
  check_method(method)
  input_ranges = _input_ranges_fn(model, spec, method, percentile)
  lows: dict[str, list[jax.Array]] = {}
  highs: dict[str, list[jax.Array]] = {}
  for batch in batches:
    images = _images(batch)
    if len(images) == 0:
      continue
    for path, (low, high) in input_ranges(variables, jnp.asarray(images)).items():
      lows.setdefault(path, []).append(low)
      highs.setdefault(path, []).append(high)
  if not lows:
    raise ValueError("calibrate_activations needs at least one non-empty calibration batch")
  scales = {}
  for path in lows:
    if method == "minmax":
      low, high = jnp.min(jnp.stack(lows[path]), 0), jnp.max(jnp.stack(highs[path]), 0)
    else:
      low, high = jnp.mean(jnp.stack(lows[path]), 0), jnp.mean(jnp.stack(highs[path]), 0)
    scales[path] = scale_from_range(low, high, spec)
  return scales

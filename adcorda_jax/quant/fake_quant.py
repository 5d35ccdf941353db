"""Uniform affine fake quantization: specs, integer ranges, scales and a straight-through op.

A tensor is quantized to integers q = clip(round(x / scale) + zero_point, qmin, qmax) and
dequantized to (q - zero_point) * scale. `fake_quantize` does both in float32, so a float model
runs "quantized" without integer kernels, and its gradient is the clipped straight-through
estimator (Bengio et al. 2013): 1 where x is representable, 0 where it was clipped.

* Symmetric specs use the signed restricted range [-(2^(b-1) - 1), 2^(b-1) - 1] with zero point 0
  (as TF Lite and AQT do), so +max and -max are both representable.
* Asymmetric specs use the unsigned range [0, 2^b - 1] with an integer zero point chosen so that
  0.0 is exactly representable (zero padding and ReLU zeros stay exact).
* Rounding is round-half-to-even (`jnp.round`), as in IEEE and TF Lite's reference kernels.

Scales are *calibrated*, not learned: gradients with respect to scale and zero point are zero.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adcorda_jax.errors import ConfigError

CALIBRATION_KEY = "model.quant.calibration"
WEIGHT_BITS = (2, 8)
ACTIVATION_BITS = (2, 16)
# Channels whose range is (numerically) zero get scale 1, so no division by zero ever happens.
_TINY = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one kind of tensor is quantized: bit width, per-channel or per-tensor, symmetric or not."""
  bits: int
  per_channel: bool
  symmetric: bool

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, int) \
        or not 2 <= self.bits <= ACTIVATION_BITS[1]:
      raise ValueError(f"QuantSpec.bits must be an integer in 2..16, got {self.bits!r}")


class ScaleZeroPoint(NamedTuple):
  """Calibrated quantization grid of one tensor; both arrays broadcast against the tensor."""
  scale: jax.Array
  zero_point: jax.Array


def _bits(quant_config: Any, key: str, prefix: str, bounds: tuple[int, int]) -> int:
  value = quant_config.get(key, 0)
  low, high = bounds
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
      or (value != 0 and not low <= value <= high):
    raise ConfigError(
        f"{prefix}.{key} must be an integer in {low}..{high} (0 = off), got {value!r}")
  return int(value)


def _flag(quant_config: Any, key: str, prefix: str, default: bool) -> bool:
  value = quant_config.get(key, default)
  if not isinstance(value, (bool, np.bool_)):
    raise ConfigError(f"{prefix}.{key} must be True or False, got {value!r}")
  return bool(value)


def _validated(quant_config: Any, prefix: str) -> tuple[int, bool, bool, int]:
  """(weight_bits, per_channel, symmetric, activation_bits), each checked with a one-line error."""
  if quant_config is None:
    return 0, True, True, 0
  weight_bits = _bits(quant_config, "weight_bits", prefix, WEIGHT_BITS)
  per_channel = _flag(quant_config, "per_channel", prefix, True)
  symmetric = _flag(quant_config, "symmetric", prefix, True)
  activation_bits = _bits(quant_config, "activation_bits", prefix, ACTIVATION_BITS)
  return weight_bits, per_channel, symmetric, activation_bits


def quant_spec_from_config(quant_config: Any, prefix: str = "model.quant") -> QuantSpec | None:
  """The weight `QuantSpec` of a `model.quant` section, or None when `weight_bits` is 0/missing.

  Reads `weight_bits` (2..8, 0 = float weights), `per_channel` and `symmetric` (bools, default
  True) and validates `activation_bits` too, so every bad field fails before any work starts.
  """
  weight_bits, per_channel, symmetric, _ = _validated(quant_config, prefix)
  return QuantSpec(weight_bits, per_channel, symmetric) if weight_bits else None


def activation_spec_from_config(quant_config: Any,
                                prefix: str = "model.quant") -> QuantSpec | None:
  """The activation `QuantSpec` (per-tensor, asymmetric), or None when `activation_bits` is 0.

  Activations share one range per layer input (per-tensor) because their channels are not known
  before calibration; asymmetric because post-ReLU inputs are non-negative.
  """
  *_, activation_bits = _validated(quant_config, prefix)
  return QuantSpec(activation_bits, False, False) if activation_bits else None


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
  """(qmin, qmax): signed restricted range when symmetric, unsigned [0, 2^b - 1] otherwise."""
  if symmetric:
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


def quantize(x: jax.Array, scale: jax.Array, zero_point: jax.Array, qmin: int, qmax: int
             ) -> jax.Array:
  """Integer codes clip(round(x / scale) + zero_point, qmin, qmax) as integer-valued float32."""
  return jnp.clip(jnp.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
  """(q - zero_point) * scale in float32; the exact inverse grid of `quantize`."""
  return (jnp.asarray(q, jnp.float32) - zero_point) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fake_quantize(x: jax.Array, scale: jax.Array, zero_point: jax.Array, qmin: int, qmax: int
                  ) -> jax.Array:
  """Quantize-dequantize `x` (float32) with a clipped straight-through gradient.

  Forward: (clip(round(x / scale) + zp, qmin, qmax) - zp) * scale, rounding half to even.
  Backward: d/dx is the incoming gradient where (qmin - zp) * scale <= x <= (qmax - zp) * scale
  and 0 outside (clipped values do not move); d/dscale and d/dzero_point are 0, because scales are
  calibrated (or recomputed from the weights) rather than learned.
  """
  return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)


def _fake_quantize_fwd(x, scale, zero_point, qmin, qmax):
  return fake_quantize(x, scale, zero_point, qmin, qmax), (x, scale, zero_point)


def _fake_quantize_bwd(qmin, qmax, residuals, g):
  x, scale, zero_point = residuals
  inside = (x >= (qmin - zero_point) * scale) & (x <= (qmax - zero_point) * scale)
  grad_x = jnp.where(inside, g, jnp.zeros_like(g))
  return grad_x, jnp.zeros_like(scale), jnp.zeros_like(zero_point)


fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def reduction_axes(ndim: int, spec: QuantSpec, channel_axis: int = -1) -> tuple[int, ...]:
  """Axes reduced to get one range per tensor, or per `channel_axis` entry when per-channel."""
  if not spec.per_channel or ndim == 0:
    return tuple(range(ndim))
  channel = channel_axis % ndim
  return tuple(axis for axis in range(ndim) if axis != channel)


def scale_from_range(low: jax.Array, high: jax.Array, spec: QuantSpec) -> ScaleZeroPoint:
  """Scale and zero point mapping the float range [low, high] onto the spec's integer range.

  Symmetric: scale = max(|low|, |high|) / qmax, zero point 0. Asymmetric: the range is widened to
  contain 0, scale = (high - low) / (qmax - qmin) and the zero point is the rounded integer that
  0.0 maps to. Zero-width ranges get scale 1 (every value there is 0 anyway).
  """
  qmin, qmax = quant_range(spec.bits, spec.symmetric)
  low = jnp.asarray(low, jnp.float32)
  high = jnp.asarray(high, jnp.float32)
  if spec.symmetric:
    scale = jnp.maximum(jnp.abs(low), jnp.abs(high)) / qmax
    scale = jnp.where(scale > _TINY, scale, 1.0)
    return ScaleZeroPoint(scale, jnp.zeros_like(scale))
  low = jnp.minimum(low, 0.0)
  high = jnp.maximum(high, 0.0)
  scale = (high - low) / (qmax - qmin)
  scale = jnp.where(scale > _TINY, scale, 1.0)
  zero_point = jnp.clip(jnp.round(qmin - low / scale), qmin, qmax)
  return ScaleZeroPoint(scale, zero_point)


def statistic_range(x: jax.Array, spec: QuantSpec, channel_axis: int = -1,
                    method: str = "minmax", percentile: float = 99.99
                    ) -> tuple[jax.Array, jax.Array]:
  """(low, high) per tensor or channel, keepdims so they broadcast against `x`.

  `minmax` takes the extremes; `percentile` takes the `percentile`-th percentile of |x| when
  symmetric (low = -high), or the (100 - p)-th / p-th percentiles of x when asymmetric, so a few
  outliers do not stretch the grid.
  """
  x = jnp.asarray(x, jnp.float32)
  axes = reduction_axes(x.ndim, spec, channel_axis)
  if method == "minmax":
    if spec.symmetric:
      high = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
      return -high, high
    return jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)
  if method == "percentile":
    if not 0 < percentile <= 100:
      raise ConfigError(f"quantize.percentile must be in (0, 100], got {percentile!r}")
    if spec.symmetric:
      high = jnp.percentile(jnp.abs(x), percentile, axis=axes, keepdims=True)
      return -high, high
    return (jnp.percentile(x, 100.0 - percentile, axis=axes, keepdims=True),
            jnp.percentile(x, percentile, axis=axes, keepdims=True))
  raise ConfigError(
      f"{CALIBRATION_KEY}={method!r} is not valid here; choose one of: minmax, percentile")


def compute_scale(x: jax.Array, spec: QuantSpec, channel_axis: int = -1,
                  method: str = "minmax", percentile: float = 99.99) -> ScaleZeroPoint:
  """Scale and zero point of `x` from its min/max or percentile range (see `statistic_range`).

  Per-channel specs get one scale per entry of `channel_axis` (the last axis of a kernel is the
  output channel for HWIO conv and [in, out] dense kernels); per-tensor specs get one scale.
  The MSE-optimal range lives in `calibration.calibrate_tensor`.
  """
  low, high = statistic_range(x, spec, channel_axis, method, percentile)
  return scale_from_range(low, high, spec)


def quantize_dequantize(x: jax.Array, spec: QuantSpec,
                        scale_zero_point: ScaleZeroPoint | None = None,
                        channel_axis: int = -1) -> jax.Array:
  """`fake_quantize(x)` on the spec's grid; min-max scales of `x` itself when none are given."""
  if scale_zero_point is None:
    scale_zero_point = compute_scale(x, spec, channel_axis)
  scale, zero_point = scale_zero_point
  qmin, qmax = quant_range(spec.bits, spec.symmetric)
  return fake_quantize(jnp.asarray(x, jnp.float32), scale, zero_point, qmin, qmax)


def is_kernel(path: tuple[Any, ...], leaf: Any) -> bool:
  """True for a conv/dense weight: a leaf named `kernel` with at least 2 dimensions."""
  last = path[-1] if path else None
  name = getattr(last, "key", getattr(last, "name", None))
  return name == "kernel" and np.ndim(leaf) >= 2


def path_string(path: tuple[Any, ...]) -> str:
  """A pytree key path as '/'-joined names, e.g. `stage1_block0/conv1/kernel`."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def kernel_paths(params: Any) -> list[str]:
  """The '/'-joined path of every quantized kernel in `params`, in leaf order."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [path_string(path) for path, leaf in leaves if is_kernel(path, leaf)]

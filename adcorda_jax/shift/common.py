"""Shared pieces of the corruption generator: severity constants, per-example keys, filters.

CIFAR-10-C's pixel-unit constants (blur sigmas and radii) are defined for 32x32 images;
`spatial_scale` multiplies them by min(H, W) / 32 so 8x8 and 224x224 images are blurred in
proportion. Filtering is a depthwise convolution (`feature_group_count` = channels) of an
explicitly padded image, so border handling matches the scipy / OpenCV mode of the original.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adcorda_jax.errors import ConfigError

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 32  # Image size CIFAR-10-C's pixel-unit constants were chosen for.
HIGHEST = jax.lax.Precision.HIGHEST  # Keep f32 convs and matmuls exact on GPU/TPU (no TF32).

CorruptionFn = Callable[[jax.Array, jax.Array, int], jax.Array]
ExampleFn = Callable[[jax.Array, jax.Array, int], jax.Array]


def check_severity(severity: object) -> int:
  """`severity` as an int in 1..5, or a one-line `ConfigError` naming `shift.severities`."""
  if (isinstance(severity, bool) or not isinstance(severity, (int, np.integer))
      or int(severity) not in SEVERITIES):
    raise ConfigError(f"shift.severities={severity!r} is not valid; choose one of: "
                      f"{', '.join(map(str, SEVERITIES))}")
  return int(severity)


def pick(constants: Sequence, severity: int):
  """The constant for `severity` (1-based) from a five-entry table."""
  return constants[check_severity(severity) - 1]


def spatial_scale(images: jax.Array) -> float:
  """Factor for 32x32 pixel-unit constants: min(H, W) / 32 (images are [..., H, W, C])."""
  return min(images.shape[-3], images.shape[-2]) / REFERENCE_SIZE


def finish(images: jax.Array) -> jax.Array:
  """Clipped to [0, 1] in float32, the output contract of every corruption."""
  return jnp.clip(images, 0.0, 1.0).astype(jnp.float32)


def _is_typed_key(key: jax.Array) -> bool:
  return jnp.issubdtype(key.dtype, jax.dtypes.prng_key)


def example_keys(key: jax.Array, count: int, start: int | jax.Array = 0) -> jax.Array:
  """Per-example keys fold_in(key, start + i) for i < count.

  Keying each example by its index (not by its batch) makes a dataset's corruption independent
  of how it is batched.
  """
  indices = jnp.asarray(start, jnp.uint32) + jnp.arange(count, dtype=jnp.uint32)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)


def keys_for_batch(key: jax.Array, count: int, start: int | jax.Array = 0) -> jax.Array:
  """`key` itself when it is already a batch of `count` keys, else `example_keys(key, count,
  start)`."""
  key = key if isinstance(key, jax.Array) else jnp.asarray(key)
  batched = key.ndim == (1 if _is_typed_key(key) else 2)
  if not batched:
    return example_keys(key, count, start)
  if key.shape[0] != count:
    raise ValueError(f"got {key.shape[0]} per-example keys for {count} images")
  return key


def per_example(single: ExampleFn) -> CorruptionFn:
  """Batches `single(key, image[H, W, C], param)` with one key per example (see above)."""
  @functools.wraps(single)
  def corruption(key: jax.Array, images: jax.Array, param) -> jax.Array:
    images = jnp.asarray(images, jnp.float32)
    keys = keys_for_batch(key, images.shape[0])
    return jax.vmap(lambda k, x: single(k, x, param))(keys, images)
  return corruption


def scalar_severity(constants: Sequence[float]) -> Callable[[ExampleFn], CorruptionFn]:
  """Decorator for `single(key, image, c)` whose severity only sets the scalar c.

  The corruption looks c up in `constants`; its `with_constant(key, images, c)` attribute takes c
  as a (traceable) value, so `corrupt` compiles once for all five severities. The random-number
  hashing dominates the compile time of the noise corruptions.
  """
  def decorate(single: ExampleFn) -> CorruptionFn:
    batched = per_example(single)

    @functools.wraps(single)
    def corruption(key: jax.Array, images: jax.Array, severity: int) -> jax.Array:
      return batched(key, images, pick(constants, severity))

    corruption.with_constant = batched
    corruption.constants = tuple(constants)
    return corruption
  return decorate


def gaussian_kernel1d(sigma: float, truncate: float) -> np.ndarray:
  """Normalised 1-D Gaussian with scipy's radius int(truncate * sigma + 0.5); [1] for sigma 0."""
  radius = int(truncate * sigma + 0.5) if sigma > 0 else 0
  if radius == 0:
    return np.ones(1, np.float32)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  return (kernel / kernel.sum()).astype(np.float32)


def filter2d(images: jax.Array, kernel: np.ndarray, mode: str) -> jax.Array:
  """Correlates every channel of [B, H, W, C] with the odd-sized 2-D `kernel`.

  `mode` is a `jnp.pad` mode: "edge" (scipy "nearest"), "reflect" (OpenCV REFLECT_101, scipy
  "mirror") or "symmetric" (scipy "reflect"); output has the input's shape.
  """
  kh, kw = kernel.shape
  if kh == kw == 1:
    return images * float(kernel[0, 0])
  channels = images.shape[-1]
  padded = jnp.pad(images, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)), mode=mode)
  weights = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, channels)), images.dtype)
  return jax.lax.conv_general_dilated(
      padded, weights, window_strides=(1, 1), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
      precision=HIGHEST)


def gaussian_filter(images: jax.Array, sigma: float, *, truncate: float = 4.0,
                    mode: str = "edge") -> jax.Array:
  """Separable Gaussian blur of [B, H, W, C] over H and W (scipy.ndimage.gaussian_filter)."""
  kernel = gaussian_kernel1d(sigma, truncate)
  rows = filter2d(images, kernel[:, None], mode)
  return filter2d(rows, kernel[None, :], mode)


def resample(images: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
  """out[b, h, w, c] = sum_ij rows[h, i] cols[w, j] images[b, i, j, c] (separable resampling)."""
  out = jnp.einsum("hi,bijc->bhjc", jnp.asarray(rows), images, precision=HIGHEST)
  return jnp.einsum("wj,bhjc->bhwc", jnp.asarray(cols), out, precision=HIGHEST)

"""Common image corruptions (Hendrycks & Dietterich 2019, CIFAR-10-C) and their registry.

Every corruption is `fn(key, images, severity) -> images`: float32 [B, H, W, C] in [0, 1] in and
out (same shape, clipped), `severity` a static Python int 1..5, jit-compilable over the whole
batch. Example i draws its noise from fold_in(key, i), or from key[i] when `key` is a batch of
per-example keys; `corrupt_dataset` uses fold_in(key, dataset index), so a dataset's corruption
does not depend on the batch size. Severity constants are CIFAR-10-C's (`make_cifar_c.py`);
pixel-unit ones are scaled by min(H, W) / 32 (see `common.spatial_scale`).

Photometric corruptions use closed forms of skimage's HSV round trip: with hue and saturation
fixed, RGB is proportional to V = max(R, G, B), so `brightness` (V + c) scales each pixel by
V' / V, and `saturate` moves each channel towards/away from V by S' / S. `saturate` is colour
only: single-channel images are returned unchanged (`COLOR_ONLY`, `corruption_names(1)` skip it).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from adcorda_jax.errors import ConfigError
from adcorda_jax.shift.blur import (
    defocus_blur,
    elastic_transform,
    gaussian_blur,
    pixelate,
    zoom_blur,
)
from adcorda_jax.shift.common import (
    SEVERITIES,
    CorruptionFn,
    check_severity,
    finish,
    keys_for_batch,
    pick,
    scalar_severity,
)
from adcorda_jax.shift.jpeg import jpeg_compression

GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # std of additive N(0, c^2)
SHOT_NOISE = (500, 250, 100, 75, 50)  # photons per unit intensity: Poisson(x c) / c
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # fraction of values set to 0 or 1
SPECKLE_NOISE = (0.06, 0.1, 0.12, 0.16, 0.2)  # std of multiplicative noise x (1 + N(0, c^2))
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor towards the per-image channel mean
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to HSV value
# (factor, offset) on HSV saturation. Recalled from make_cifar_c.py and not verified there
# (ImageNet-C uses (0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)).
SATURATE = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))


@scalar_severity(GAUSSIAN_NOISE)
def gaussian_noise(key: jax.Array, image: jax.Array, c: float) -> jax.Array:
  """Additive Gaussian noise with std c."""
  return finish(image + c * jax.random.normal(key, image.shape))


@scalar_severity(SHOT_NOISE)
def shot_noise(key: jax.Array, image: jax.Array, c: float) -> jax.Array:
  """Poisson (photon) noise: Poisson(x c) / c."""
  counts = jax.random.poisson(key, jnp.clip(image, 0.0, 1.0) * c, image.shape)
  return finish(counts.astype(jnp.float32) / c)


@scalar_severity(IMPULSE_NOISE)
def impulse_noise(key: jax.Array, image: jax.Array, c: float) -> jax.Array:
  """Salt-and-pepper noise (skimage `s&p`): each value flips with prob. c, to 0 or 1 evenly."""
  flip, salt = jax.random.uniform(key, (2,) + image.shape)  # one draw: one hash to compile
  return finish(jnp.where(flip < c, (salt < 0.5).astype(jnp.float32), image))


@scalar_severity(SPECKLE_NOISE)
def speckle_noise(key: jax.Array, image: jax.Array, c: float) -> jax.Array:
  """Multiplicative Gaussian noise x + x N(0, c^2)."""
  return finish(image + image * c * jax.random.normal(key, image.shape))


def contrast(key: jax.Array, images: jax.Array, severity: int) -> jax.Array:
  """Shrinks each image towards its per-channel spatial mean by factor c."""
  del key
  images = jnp.asarray(images, jnp.float32)
  means = jnp.mean(images, axis=(1, 2), keepdims=True)
  return finish((images - means) * pick(CONTRAST, severity) + means)


def brightness(key: jax.Array, images: jax.Array, severity: int) -> jax.Array:
  """HSV value + c (clipped to 1), hue and saturation kept; gray images get x + c."""
  del key
  images = jnp.asarray(images, jnp.float32)
  value = jnp.max(images, axis=-1, keepdims=True)
  brighter = jnp.clip(value + pick(BRIGHTNESS, severity), 0.0, 1.0)
  ratio = brighter / jnp.where(value > 0, value, 1.0)
  # Black pixels have S = 0 in skimage, so they become gray at the new value.
  return finish(jnp.where(value > 0, images * ratio, brighter))


def saturate(key: jax.Array, images: jax.Array, severity: int) -> jax.Array:
  """HSV saturation S -> clip(S a + b); colour images only (gray ones are returned as is).

  Follows skimage exactly, including its hue 0 (red) for gray pixels: a positive offset b
  (severities 4, 5) tints gray pixels red, as in CIFAR-10-C.
  """
  del key
  images = jnp.asarray(images, jnp.float32)
  factor, offset = pick(SATURATE, severity)
  if images.shape[-1] != 3:
    return finish(images)
  value = jnp.max(images, axis=-1, keepdims=True)
  delta = value - jnp.min(images, axis=-1, keepdims=True)
  colored = delta > 0
  sat = jnp.where(colored, delta / jnp.where(value > 0, value, 1.0), 0.0)
  new_sat = jnp.clip(sat * factor + offset, 0.0, 1.0)
  # RGB = V - V S g(h) with g(h) in [0, 1]^3 and V S = delta, so RGB' = V - (V S' / delta)(V - RGB).
  colour = value - (value * new_sat / jnp.where(colored, delta, 1.0)) * (value - images)
  gray = value * (1.0 - new_sat * jnp.asarray([0.0, 1.0, 1.0]))  # hue 0: g = (0, 1, 1)
  return finish(jnp.where(colored, colour, gray))


CORRUPTIONS: dict[str, CorruptionFn] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "defocus_blur": defocus_blur,
    "gaussian_blur": gaussian_blur,
    "zoom_blur": zoom_blur,
    "brightness": brightness,
    "contrast": contrast,
    "saturate": saturate,
    "pixelate": pixelate,
    "elastic_transform": elastic_transform,
    "jpeg_compression": jpeg_compression,
}
NOISE_CORRUPTIONS = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
                               "elastic_transform"})  # the ones that use their key
COLOR_ONLY = frozenset({"saturate"})


def corruption_names(channels: int = 3) -> list[str]:
  """Registered names that change images with `channels` channels (skips colour-only on gray)."""
  return [n for n in CORRUPTIONS if channels == 3 or n not in COLOR_ONLY]


def check_name(name: object) -> str:
  """`name` if registered, else a one-line `ConfigError` naming `shift.corruptions`."""
  if not isinstance(name, str) or name not in CORRUPTIONS:
    raise ConfigError(f"shift.corruptions={name!r} is not valid; choose one of: "
                      f"{', '.join(CORRUPTIONS)}")
  return name


@functools.cache
def _jitted(name: str, severity: int | None) -> Callable[..., jax.Array]:
  """Jitted (key, start, images[, c]): example i keyed by fold_in(key, start + i).

  `severity` is None for `scalar_severity` corruptions, whose constant c is an argument, so one
  compilation (per input shape) serves every severity.
  """
  fn = CORRUPTIONS[name]
  if severity is None:
    return jax.jit(lambda key, start, images, c: fn.with_constant(
        keys_for_batch(key, images.shape[0], start), images, c))
  return jax.jit(lambda key, start, images: fn(
      keys_for_batch(key, images.shape[0], start), images, severity))


def _runner(name: str, severity: int) -> Callable[[jax.Array, object, jax.Array], jax.Array]:
  """(key, start, images) -> corrupted, through the cached compiled function."""
  fn = CORRUPTIONS[name]
  if hasattr(fn, "with_constant"):
    c = jnp.float32(pick(fn.constants, severity))
    jitted = _jitted(name, None)
    return lambda key, start, images: jitted(key, start, images, c)
  return _jitted(name, severity)


def compiled(name: str, severity: int) -> CorruptionFn:
  """The cached jitted `(key, images) -> images` function for `name` at `severity`."""
  run = _runner(check_name(name), check_severity(severity))
  return lambda key, images: run(key, np.uint32(0), images)


def _check_images(images: object) -> None:
  if np.ndim(images) != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {np.shape(images)}")


def corrupt(key: jax.Array, images: jax.Array, name: str, severity: int) -> jax.Array:
  """Validates `name` / `severity` and applies that corruption in one jitted call.

  `key` is one PRNG key (example i uses fold_in(key, i)) or a batch of per-example keys.
  """
  run = _runner(check_name(name), check_severity(severity))
  _check_images(images)
  return run(key, np.uint32(0), jnp.asarray(images, jnp.float32))


def corrupt_dataset(key: jax.Array, images: np.ndarray, name: str, severity: int, *,
                    batch_size: int = 256) -> np.ndarray:
  """Corrupts a whole [N, H, W, C] array in fixed-size batches, returned as float32 numpy.

  The last batch is zero-padded so one compilation serves every batch, and example i is keyed
  by fold_in(key, i): the output equals `corrupt(key, images, ...)` and does not depend on
  `batch_size`.
  """
  check_name(name)
  severity = check_severity(severity)
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
      or batch_size <= 0:
    raise ConfigError(f"shift.batch_size must be an integer > 0, got {batch_size!r}")
  _check_images(images)
  images = np.asarray(images, np.float32)
  count = len(images)
  if count == 0:
    return images.copy()
  size = min(int(batch_size), count)
  run = _runner(name, severity)
  outputs = []
  for start in range(0, count, size):
    batch = images[start:start + size]
    real = len(batch)
    if real < size:
      batch = np.concatenate([batch, np.zeros((size - real,) + batch.shape[1:], np.float32)])
    outputs.append(np.asarray(run(key, np.uint32(start), batch))[:real])
  return np.concatenate(outputs)


__all__ = ["BRIGHTNESS", "COLOR_ONLY", "CONTRAST", "CORRUPTIONS", "GAUSSIAN_NOISE",
           "IMPULSE_NOISE", "NOISE_CORRUPTIONS", "SATURATE", "SEVERITIES", "SHOT_NOISE",
           "SPECKLE_NOISE", "brightness", "check_name", "compiled", "contrast", "corrupt",
           "corrupt_dataset", "corruption_names", "defocus_blur", "elastic_transform",
           "gaussian_blur", "gaussian_noise", "impulse_noise", "jpeg_compression", "pixelate",
           "saturate", "shot_noise", "speckle_noise", "zoom_blur"]

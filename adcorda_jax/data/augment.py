"""Standard CIFAR-style training augmentation as a pure, jittable JAX function."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def random_crop_flip(rng: jax.Array, images: jax.Array, padding: int) -> jax.Array:
  """Zero-pads each NHWC image by `padding`, crops a random HxW window, flips it with p=0.5.

  Each example gets its own key (`jax.random.split` + `jax.vmap`), so results are deterministic
  for a given `rng` and independent across the batch. `padding` must be a static Python int;
  0 means flip only. The output has the input's shape and dtype.
  """
  if padding < 0:
    raise ValueError(f"padding must be >= 0, got {padding}")
  _, height, width, channels = images.shape
  keys = jax.random.split(rng, images.shape[0])

  def augment_one(key: jax.Array, image: jax.Array) -> jax.Array:
    crop_key, flip_key = jax.random.split(key)
    if padding:
      padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
      top, left = jax.random.randint(crop_key, (2,), 0, 2 * padding + 1)
      image = jax.lax.dynamic_slice(padded, (top, left, 0), (height, width, channels))
    return jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)

  return jax.vmap(augment_one)(keys, images)

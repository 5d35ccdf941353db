"""JPEG-like compression in JAX: baseline JFIF coding up to the (lossless) entropy coder.

Matches what PIL/libjpeg does for `save(..., "JPEG", quality=q)`: round to 8-bit, RGB -> YCbCr,
4:2:0 chroma subsampling (2x2 mean; "fancy" triangular upsampling on decode), 8x8 block DCT as a
matrix product, quantisation with the standard Annex K tables scaled by libjpeg's quality rule,
inverse DCT and rounding back to 8-bit. Single-channel images code the luma plane only. Edges
are padded by replication to whole blocks (16x16 MCUs for colour), as libjpeg does. Not bit-exact
with libjpeg (float DCT, rounding details), but errors behave the same way with quality.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adcorda_jax.shift.common import HIGHEST, finish, pick

JPEG_QUALITY = (80, 65, 58, 50, 40)

# ITU T.81 Annex K.1 / K.2 quantisation tables (quality 50).
LUMA_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99]], np.float64)
CHROMA_TABLE = np.full((8, 8), 99.0)
CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def quality_table(base: np.ndarray, quality: int) -> np.ndarray:
  """libjpeg's `jpeg_quality_scaling`: 5000 / q below 50, else 200 - 2q percent, in [1, 255]."""
  quality = min(max(int(quality), 1), 100)
  percent = 5000 // quality if quality < 50 else 200 - 2 * quality
  return np.clip((base * percent + 50) // 100, 1, 255).astype(np.float32)


def dct_matrix(size: int = 8) -> np.ndarray:
  """Orthonormal DCT-II matrix; D @ block @ D.T is JPEG's forward DCT scaling."""
  k = np.arange(size)[:, None]
  n = np.arange(size)[None, :]
  matrix = np.sqrt(2.0 / size) * np.cos((2 * n + 1) * k * np.pi / (2 * size))
  matrix[0] /= np.sqrt(2.0)
  return matrix.astype(np.float32)


def _code_plane(plane: jax.Array, table: np.ndarray) -> jax.Array:
  """Level-shifted DCT, quantise, dequantise and inverse DCT of [B, H, W] (H, W multiples of 8)."""
  batch, height, width = plane.shape
  d = jnp.asarray(dct_matrix())
  blocks = (plane - 128.0).reshape(batch, height // 8, 8, width // 8, 8)
  coefficients = jnp.einsum("uh,bihjw,vw->biujv", d, blocks, d, precision=HIGHEST)
  q = jnp.asarray(table)[None, None, :, None, :]
  coefficients = jnp.round(coefficients / q) * q
  blocks = jnp.einsum("uh,biujv,vw->bihjw", d, coefficients, d, precision=HIGHEST)
  return jnp.clip(blocks.reshape(batch, height, width) + 128.0, 0.0, 255.0)


def _fancy_upsample(plane: jax.Array, axis: int) -> jax.Array:
  """libjpeg h2v2 "fancy" upsampling along one axis: (3 * nearer + farther) / 4."""
  n = plane.shape[axis]
  before = jnp.take(plane, np.maximum(np.arange(n) - 1, 0), axis=axis)
  after = jnp.take(plane, np.minimum(np.arange(n) + 1, n - 1), axis=axis)
  even = (3.0 * plane + before) / 4.0
  odd = (3.0 * plane + after) / 4.0
  stacked = jnp.stack([even, odd], axis=axis + 1)
  shape = list(plane.shape)
  shape[axis] = 2 * n
  return stacked.reshape(shape)


def _subsample(plane: jax.Array) -> jax.Array:
  """2x2 mean of [B, H, W] (H, W even)."""
  batch, height, width = plane.shape
  return plane.reshape(batch, height // 2, 2, width // 2, 2).mean(axis=(2, 4))


def jpeg_roundtrip(images: jax.Array, quality: int) -> jax.Array:
  """Encodes and decodes [B, H, W, 1 or 3] images in [0, 1] at JPEG `quality` (1..100)."""
  images = jnp.asarray(images, jnp.float32)
  height, width, channels = images.shape[1:]
  if channels not in (1, 3):
    raise ValueError(f"JPEG needs 1 or 3 channels, got {channels}")
  block = 8 if channels == 1 else 16
  pad_h, pad_w = -height % block, -width % block
  pixels = jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0)
  pixels = jnp.pad(pixels, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
  luma_table = quality_table(LUMA_TABLE, quality)
  if channels == 1:
    decoded = _code_plane(pixels[..., 0], luma_table)[..., None]
  else:
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    y = jnp.round(0.299 * r + 0.587 * g + 0.114 * b)
    cb = jnp.round(-0.168736 * r - 0.331264 * g + 0.5 * b + 128.0)
    cr = jnp.round(0.5 * r - 0.418688 * g - 0.081312 * b + 128.0)
    chroma_table = quality_table(CHROMA_TABLE, quality)
    y = _code_plane(y, luma_table)

    def chroma(plane: jax.Array) -> jax.Array:
      coded = _code_plane(_subsample(plane), chroma_table)
      return _fancy_upsample(_fancy_upsample(coded, 1), 2) - 128.0

    cb, cr = chroma(cb), chroma(cr)
    decoded = jnp.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb],
                        axis=-1)
  decoded = jnp.round(jnp.clip(decoded, 0.0, 255.0))[:, :height, :width]
  return finish(decoded / 255.0)


def jpeg_compression(key: jax.Array, images: jax.Array, severity: int) -> jax.Array:
  """`jpeg_roundtrip` at the CIFAR-10-C quality for `severity`."""
  del key
  return jpeg_roundtrip(images, pick(JPEG_QUALITY, severity))


__all__ = ["CHROMA_TABLE", "JPEG_QUALITY", "LUMA_TABLE", "dct_matrix", "jpeg_compression",
           "jpeg_roundtrip", "quality_table"]

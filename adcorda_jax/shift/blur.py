"""Spatial corruptions: defocus, Gaussian and zoom blur, pixelate and elastic transform.

Each follows the CIFAR-10-C recipe (Hendrycks & Dietterich 2019, `make_cifar_c.py`), with
pixel-unit constants multiplied by `spatial_scale` = min(H, W) / 32. Zoom factors and pixelate
ratios are already relative to the image size and are used as they are. Resampling steps are
fixed matrices built in numpy at trace time (the shapes are static) and applied as matmuls.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

from adcorda_jax.shift.common import (
    filter2d,
    finish,
    gaussian_filter,
    per_example,
    pick,
    resample,
    spatial_scale,
)

# (disk radius, anti-aliasing sigma) in pixels at 32x32.
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)  # sigma in pixels at 32x32
# np.arange with a float step, exactly as in the original (the endpoint may or may not be hit).
ZOOM_BLUR = tuple(np.arange(1, stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26))
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # side of the coarse image / side of the image
# (alpha, sigma, affine jitter) as fractions of the image side (CIFAR: IMSIZE * fraction).
ELASTIC_TRANSFORM = ((0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                     (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))


def gaussian_blur(key: jax.Array, images: jax.Array, severity: int) -> jax.Array:
  """skimage `gaussian(sigma)` per channel: truncate 4, edge ("nearest") padding."""
  del key
  images = jnp.asarray(images, jnp.float32)
  sigma = pick(GAUSSIAN_BLUR, severity) * spatial_scale(images)
  return finish(gaussian_filter(images, sigma, truncate=4.0, mode="edge"))


def disk_kernel(radius: float, alias_blur: float, alias_halfwidth: int = 1) -> np.ndarray:
  """Normalised disk x^2 + y^2 <= radius^2 smoothed by a Gaussian (the original's `disk`).

  The original smooths with a fixed 3x3 `cv2.GaussianBlur` (half-width 1); larger images pass a
  proportionally wider `alias_halfwidth`. Sums to 1, so constant images stay constant.
  """
  half = math.ceil(radius) + alias_halfwidth
  grid = np.arange(-half, half + 1)
  x, y = np.meshgrid(grid, grid)
  disk = ((x ** 2 + y ** 2) <= radius ** 2).astype(np.float64)
  disk /= disk.sum()
  taps = np.arange(-alias_halfwidth, alias_halfwidth + 1, dtype=np.float64)
  gauss = np.exp(-0.5 * (taps / alias_blur) ** 2)
  gauss /= gauss.sum()
  # 'same'-size separable smoothing; the disk sits `alias_halfwidth` away from the border.
  smooth = np.apply_along_axis(lambda r: np.convolve(r, gauss, mode="same"), 0, disk)
  smooth = np.apply_along_axis(lambda r: np.convolve(r, gauss, mode="same"), 1, smooth)
  return (smooth / smooth.sum()).astype(np.float32)


def defocus_blur(key: jax.Array, images: jax.Array, severity: int) -> jax.Array:
  """Convolution with an anti-aliased disk (`cv2.filter2D`, REFLECT_101 borders)."""
  del key
  images = jnp.asarray(images, jnp.float32)
  scale = spatial_scale(images)
  radius, alias_blur = pick(DEFOCUS_BLUR, severity)
  kernel = disk_kernel(radius * scale, alias_blur * scale, max(1, round(scale)))
  return finish(filter2d(images, kernel, mode="reflect"))


def _linear_rows(coordinates: np.ndarray, size: int) -> np.ndarray:
  """Matrix [len(coordinates), size] of linear interpolation at in-range coordinates."""
  matrix = np.zeros((len(coordinates), size), np.float64)
  lower = np.clip(np.floor(coordinates).astype(int), 0, size - 1)
  frac = coordinates - lower
  upper = np.minimum(lower + 1, size - 1)
  rows = np.arange(len(coordinates))
  np.add.at(matrix, (rows, lower), 1.0 - frac)
  np.add.at(matrix, (rows, upper), frac)
  return matrix


def clipped_zoom_matrix(size: int, zoom: float) -> np.ndarray:
  """[size, size] matrix of the original's `clipped_zoom` along one axis.

  Crops the central ceil(size / zoom) pixels, zooms them with `scipy.ndimage.zoom(order=1)`
  (corner-aligned: out pixel o samples o * (crop - 1) / (out - 1)) and keeps the centre `size`.
  """
  crop = int(np.ceil(size / zoom))
  top = (size - crop) // 2
  out = round(crop * zoom)  # scipy's output size (Python round, as scipy uses).
  trim = (out - size) // 2
  step = (crop - 1) / (out - 1) if out > 1 else 0.0
  coordinates = top + (np.arange(size) + trim) * step
  return _linear_rows(coordinates, size).astype(np.float32)


def zoom_blur(key: jax.Array, images: jax.Array, severity: int) -> jax.Array:
  """Mean of the image and its centre zooms by each factor (all relative, so no scaling)."""
  del key
  images = jnp.asarray(images, jnp.float32)
  height, width = images.shape[1:3]
  zooms = pick(ZOOM_BLUR, severity)
  rows = np.stack([clipped_zoom_matrix(height, z) for z in zooms])
  cols = np.stack([clipped_zoom_matrix(width, z) for z in zooms])
  partial = jnp.einsum("zhi,bijc->bzhjc", jnp.asarray(rows), images,
                       precision=jax.lax.Precision.HIGHEST)
  total = jnp.einsum("zwj,bzhjc->bhwc", jnp.asarray(cols), partial,
                     precision=jax.lax.Precision.HIGHEST)
  return finish((images + total) / (len(zooms) + 1))


def box_down_matrix(size: int, small: int) -> np.ndarray:
  """[small, size] PIL `BOX` downsampling: each input pixel goes, with equal weight, to the
  output pixel whose box contains its centre."""
  scale = size / small
  target = np.clip(np.ceil((np.arange(size) + 0.5) / scale).astype(int) - 1, 0, small - 1)
  matrix = np.zeros((small, size), np.float64)
  matrix[target, np.arange(size)] = 1.0
  return matrix / matrix.sum(axis=1, keepdims=True)


def nearest_up_matrix(size: int, small: int) -> np.ndarray:
  """[size, small] PIL `BOX` upsampling, which is nearest neighbour floor((o + 0.5) * s / S)."""
  source = np.minimum(np.floor((np.arange(size) + 0.5) * small / size).astype(int), small - 1)
  matrix = np.zeros((size, small), np.float64)
  matrix[np.arange(size), source] = 1.0
  return matrix


def pixelate_to(images: jax.Array, height: int, width: int) -> jax.Array:
  """Box-downsamples [B, H, W, C] to height x width, then nearest-upsamples back to H x W."""
  images = jnp.asarray(images, jnp.float32)
  big_h, big_w = images.shape[1:3]
  rows = nearest_up_matrix(big_h, height) @ box_down_matrix(big_h, height)
  cols = nearest_up_matrix(big_w, width) @ box_down_matrix(big_w, width)
  return finish(resample(images, rows.astype(np.float32), cols.astype(np.float32)))


def pixelate(key: jax.Array, images: jax.Array, severity: int) -> jax.Array:
  """`pixelate_to(int(H * c), int(W * c))`, as the original's int(32 * c) at 32x32."""
  del key
  factor = pick(PIXELATE, severity)
  images = jnp.asarray(images, jnp.float32)
  height, width = images.shape[1:3]
  return pixelate_to(images, max(1, int(height * factor)), max(1, int(width * factor)))


def _warp(image: jax.Array, rows: jax.Array, cols: jax.Array, mode: str) -> jax.Array:
  """Bilinear samples image[rows, cols, c] for every channel ([H, W] coordinate maps)."""
  sample = lambda channel: map_coordinates(channel, [rows, cols], order=1, mode=mode)
  return jax.vmap(sample, in_axes=-1, out_axes=-1)(image)


def _elastic_single(key: jax.Array, image: jax.Array, severity: int) -> jax.Array:
  """Random affine warp then a smooth random displacement field (the original's order)."""
  height, width = image.shape[:2]
  side = min(height, width)
  alpha, sigma, jitter = (f * side for f in pick(ELASTIC_TRANSFORM, severity))
  # One uniform draw for the affine jitter and both fields (one hash to compile, not three).
  draws = jax.random.uniform(key, (6 + 2 * height * width,), minval=-1.0, maxval=1.0)
  fields = draws[6:].reshape(2, 1, height, width, 1)
  # Three reference points around the centre, in (x, y) order as cv2.getAffineTransform takes.
  # The original uses (H // 2, W // 2) as (x, y); identical for the square images it handles.
  cx, cy, half = width // 2, height // 2, side // 3
  source = np.float32([[cx + half, cy + half], [cx + half, cy - half], [cx - half, cy - half]])
  moved = source + jitter * draws[:6].reshape(3, 2)
  # warpAffine samples dst(p) = src(M^-1 p) where M maps source -> moved, so solve moved -> source.
  inverse = jnp.linalg.solve(jnp.concatenate([moved, jnp.ones((3, 1))], axis=1), source)
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")
  points = jnp.stack([xs, ys, jnp.ones_like(xs)], axis=-1)
  warped_xy = jnp.einsum("hwk,kj->hwj", points, inverse, precision=jax.lax.Precision.HIGHEST)
  image = _warp(image, warped_xy[..., 1], warped_xy[..., 0], mode="mirror")  # REFLECT_101
  if alpha == 0:
    return image

  dx, dy = gaussian_filter(fields.reshape(2, height, width, 1), sigma, truncate=3.0,
                           mode="symmetric")[..., 0] * alpha
  return _warp(image, ys + dy, xs + dx, mode="reflect")


_elastic_batched = per_example(_elastic_single)


def elastic_transform(key: jax.Array, images: jax.Array, severity: int) -> jax.Array:
  """Elastic transform: affine jitter, then a Gaussian-smoothed uniform displacement field."""
  return finish(_elastic_batched(key, images, severity))


__all__ = ["DEFOCUS_BLUR", "ELASTIC_TRANSFORM", "GAUSSIAN_BLUR", "PIXELATE", "ZOOM_BLUR",
           "box_down_matrix", "clipped_zoom_matrix", "defocus_blur", "disk_kernel",
           "elastic_transform", "gaussian_blur", "nearest_up_matrix",
           "pixelate", "pixelate_to", "zoom_blur"]

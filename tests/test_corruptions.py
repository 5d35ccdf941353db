"""Corruption generator: output contract, determinism, severity ordering, reference checks."""
from __future__ import annotations

import io
import itertools

import jax
import matplotlib.image
import numpy as np
import pytest
import scipy.ndimage as ndi
from matplotlib import colors
from PIL import Image

from adcorda_jax.errors import ConfigError
from adcorda_jax.shift import (
    COLOR_ONLY,
    CORRUPTIONS,
    NOISE_CORRUPTIONS,
    SEVERITIES,
    blur,
    corrupt,
    corrupt_dataset,
    corruption_names,
    corruptions,
    jpeg_roundtrip,
    pixelate_to,
    preview,
    save_preview_grid,
)
from tests.helpers import one_line

KEY = jax.random.PRNGKey(0)
SHAPES = [(4, 8, 8, 1), (4, 28, 28, 1), (4, 32, 32, 3)]
COLOR = (4, 32, 32, 3)  # Shape shared by most tests, so their compilations are reused.


def random_images(shape, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


def natural_images() -> np.ndarray:
  """[4, 32, 32, 3]: smooth gradients, a sinusoid and a sharp-edged patch, in four poses."""
  yy, xx = np.mgrid[0:32, 0:32] / 31.0
  image = np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * xx) * np.cos(5 * yy)], axis=-1)
  image[8:20, 10:22] = [0.9, 0.2, 0.1]
  return np.stack([image, image[::-1], image[:, ::-1], image.transpose(1, 0, 2)]
                  ).astype(np.float32)


def run(name: str, images: np.ndarray, severity: int, key=KEY) -> np.ndarray:
  return np.asarray(corrupt(key, images, name, severity))


def _slow_but(values, fast):
  """`values` as parameters, each marked slow except `fast` (the fast tier's one case)."""
  return [pytest.param(v, marks=() if v == fast else pytest.mark.slow) for v in values]


# The fast tier checks every corruption once (severity 3, colour); the full suite all of them.
@pytest.mark.parametrize("shape", _slow_but(SHAPES, COLOR),
                         ids=lambda s: "x".join(map(str, s[1:])))
@pytest.mark.parametrize("severity", _slow_but(SEVERITIES, 3))
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_output_contract(name, severity, shape):
  images = random_images(shape)
  out = run(name, images, severity)
  assert out.shape == shape and out.dtype == np.float32
  assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["defocus_blur", "zoom_blur", "jpeg_compression",
                                  "elastic_transform", "gaussian_noise"])
def test_large_images(name):
  images = random_images((2, 224, 224, 3))
  out = run(name, images, 3)
  assert out.shape == images.shape and out.dtype == np.float32
  assert out.min() >= 0.0 and out.max() <= 1.0 and 0.0 < np.abs(out - images).mean() < 0.5


def test_blur_width_scales_with_image_size():
  """Severity-5 Gaussian blur has sigma 1 px at 32x32 and 7 px at 224x224 (min(H, W) / 32)."""
  for size, sigma in [(32, 1.0), (224, 7.0)]:
    images = np.zeros((2, size, size, 3), np.float32)
    images[0, size // 2, size // 2] = 1.0
    out = run("gaussian_blur", images, 5)[0, :, :, 0]
    offsets = np.arange(size) - size // 2
    spread = np.sqrt(np.sum(out.sum(axis=1) * offsets ** 2) / out.sum())
    assert spread == pytest.approx(sigma, rel=0.02)


@pytest.mark.slow
def test_raw_functions_jit_with_static_severity():
  images = random_images(COLOR)
  for name, fn in CORRUPTIONS.items():
    jitted = jax.jit(fn, static_argnums=2)(KEY, images, 3)
    np.testing.assert_allclose(np.asarray(jitted), run(name, images, 3), atol=1e-5,
                               err_msg=name)


def test_same_key_same_output_and_different_key_differs():
  images = random_images(COLOR)
  for name in CORRUPTIONS:
    first, again = run(name, images, 3), run(name, images, 3)
    assert np.array_equal(first, again), name
    other = run(name, images, 3, key=jax.random.PRNGKey(1))
    assert np.array_equal(first, other) == (name not in NOISE_CORRUPTIONS), name


@pytest.mark.slow
def test_examples_get_different_noise_and_typed_keys_work():
  images = np.repeat(random_images((1, 32, 32, 3)), 4, axis=0)
  for name in sorted(NOISE_CORRUPTIONS):
    out = run(name, images, 4)
    assert not np.array_equal(out[0], out[1]), name
  typed = np.asarray(corrupt(jax.random.key(0), images, "gaussian_noise", 4))
  assert np.array_equal(typed, run("gaussian_noise", images, 4))
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(KEY, np.arange(4, dtype=np.uint32))
  assert np.array_equal(np.asarray(corrupt(keys, images, "gaussian_noise", 4)),
                        run("gaussian_noise", images, 4))


MONOTONE = [n for n in CORRUPTIONS if n not in ("saturate", "elastic_transform")]


@pytest.mark.slow
def test_severity_is_monotone_in_effect():
  """Mean |corrupted - clean| does not drop with severity (saturate first desaturates then
  oversaturates, and CIFAR-10-C's elastic constants shrink the affine jitter with severity)."""
  images = natural_images()
  for name in MONOTONE:
    errors = [np.abs(run(name, images, s) - images).mean() for s in SEVERITIES]
    assert errors[0] > 0.0, name
    for low, high in itertools.pairwise(errors):
      assert high >= 0.98 * low, (name, errors)


def test_contrast_leaves_constant_images_and_brightness_raises_the_mean():
  constant = np.full(COLOR, 0.3, np.float32)
  for severity in SEVERITIES:
    np.testing.assert_allclose(run("contrast", constant, severity), constant, atol=1e-6)
  images = natural_images()
  assert run("brightness", images, 1).mean() > images.mean() + 0.02
  gray = random_images((4, 28, 28, 1))
  np.testing.assert_allclose(run("brightness", gray, 5),
                             np.clip(gray + corruptions.BRIGHTNESS[4], 0, 1), atol=1e-6)


@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "zoom_blur", "pixelate"])
def test_spatial_corruptions_keep_constant_images(name):
  constant = np.full(COLOR, 0.7, np.float32)
  for severity in SEVERITIES:
    np.testing.assert_allclose(run(name, constant, severity), constant, atol=1e-6)


def test_pixelate_of_block_image_at_matching_factor_is_identity():
  blocks = np.kron(random_images((2, 4, 4, 3)), np.ones((1, 2, 2, 1), np.float32))
  np.testing.assert_array_equal(np.asarray(pixelate_to(blocks, 4, 4)), blocks)
  assert np.abs(np.asarray(pixelate_to(random_images((2, 8, 8, 3)), 4, 4))
                - random_images((2, 8, 8, 3))).mean() > 0.1


@pytest.mark.slow
def test_jpeg_error_grows_as_quality_drops():
  images = natural_images()
  errors = [np.abs(np.asarray(jpeg_roundtrip(images, q)) - images).mean() for q in (100, 80, 40)]
  assert errors[0] < errors[1] < errors[2]
  gray = natural_images()[..., :1]
  assert np.abs(np.asarray(jpeg_roundtrip(gray, 100)) - gray).max() <= 2.5 / 255


def test_impulse_noise_sets_a_fraction_of_values_to_exactly_0_or_1():
  images = 0.1 + 0.8 * random_images(COLOR)
  for severity in (1, 5):
    out = run("impulse_noise", images, severity)
    changed = out != images
    assert set(np.unique(out[changed])) == {0.0, 1.0}
    fraction = corruptions.IMPULSE_NOISE[severity - 1]
    assert changed.mean() == pytest.approx(fraction, abs=4 * np.sqrt(fraction / changed.size))


def test_noise_statistics():
  images = np.full(COLOR, 0.5, np.float32)
  for severity in (1, 5):
    c = corruptions.GAUSSIAN_NOISE[severity - 1]
    assert np.std(run("gaussian_noise", images, severity) - images) == pytest.approx(c, rel=0.05)
    lam = corruptions.SHOT_NOISE[severity - 1]
    shot = run("shot_noise", images, severity)
    assert shot.mean() == pytest.approx(0.5, abs=0.01)
    assert shot.var() == pytest.approx(0.5 / lam, rel=0.1)  # Poisson(x c) / c: variance x / c


def test_saturate_matches_hsv_round_trip_and_skips_gray():
  images = random_images(COLOR)
  images[0, :4] = 0.5  # gray pixels: hue 0 in skimage / matplotlib, so they tint red
  images[0, 4:8] = 0.0
  for severity in SEVERITIES:
    factor, offset = corruptions.SATURATE[severity - 1]
    hsv = colors.rgb_to_hsv(images)
    hsv[..., 1] = np.clip(hsv[..., 1] * factor + offset, 0, 1)
    np.testing.assert_allclose(run("saturate", images, severity), colors.hsv_to_rgb(hsv),
                               atol=1e-5)
    hsv = colors.rgb_to_hsv(images)
    hsv[..., 2] = np.clip(hsv[..., 2] + corruptions.BRIGHTNESS[severity - 1], 0, 1)
    np.testing.assert_allclose(run("brightness", images, severity), colors.hsv_to_rgb(hsv),
                               atol=1e-5)
  gray = random_images((4, 28, 28, 1))
  assert np.array_equal(run("saturate", gray, 5), gray)
  assert "saturate" in COLOR_ONLY and "saturate" not in corruption_names(1)


def _clipped_zoom(image: np.ndarray, zoom: float) -> np.ndarray:
  """The original `clipped_zoom` with scipy."""
  size = image.shape[0]
  crop = int(np.ceil(size / zoom))
  top = (size - crop) // 2
  image = ndi.zoom(image[top:top + crop, top:top + crop], (zoom, zoom, 1), order=1)
  trim = (image.shape[0] - size) // 2
  return image[trim:trim + size, trim:trim + size]


def test_blurs_match_scipy_references():
  images = random_images(COLOR)
  for severity in SEVERITIES:
    sigma = blur.GAUSSIAN_BLUR[severity - 1]
    expected = ndi.gaussian_filter(images, (0, sigma, sigma, 0), mode="nearest", truncate=4.0)
    np.testing.assert_allclose(run("gaussian_blur", images, severity), expected, atol=1e-5)

    zooms = blur.ZOOM_BLUR[severity - 1]
    expected = (images[0] + sum(_clipped_zoom(images[0], z) for z in zooms)) / (len(zooms) + 1)
    np.testing.assert_allclose(run("zoom_blur", images, severity)[0], expected, atol=1e-5)

    radius, alias = blur.DEFOCUS_BLUR[severity - 1]  # disk() with cv2's 3x3 GaussianBlur
    grid = np.arange(-8, 9)
    disk = (np.add.outer(grid ** 2, grid ** 2) <= radius ** 2).astype(np.float64)
    gauss = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias ** 2))
    kernel = ndi.correlate1d(ndi.correlate1d(disk / disk.sum(), gauss / gauss.sum(), 0), gauss
                             / gauss.sum(), 1)
    expected = ndi.correlate(images, kernel[None, :, :, None], mode="mirror")
    np.testing.assert_allclose(run("defocus_blur", images, severity), expected, atol=1e-5)


@pytest.mark.slow
def test_pixelate_and_jpeg_match_pil():
  pixels = np.random.default_rng(1).integers(0, 256, COLOR).astype(np.uint8)
  images = pixels.astype(np.float32) / 255
  for severity in SEVERITIES:
    small = int(32 * blur.PIXELATE[severity - 1])
    expected = np.stack([np.asarray(Image.fromarray(p).resize((small, small), Image.BOX)
                                    .resize((32, 32), Image.BOX)) for p in pixels]) / 255
    np.testing.assert_allclose(run("pixelate", images, severity), expected, atol=1.01 / 255)
  natural = np.round(natural_images() * 255).astype(np.uint8)
  for quality in (80, 40):
    decoded = []
    for p in natural:
      buffer = io.BytesIO()
      Image.fromarray(p).save(buffer, "JPEG", quality=quality)
      decoded.append(np.asarray(Image.open(buffer)))
    ours = np.asarray(jpeg_roundtrip(natural.astype(np.float32) / 255, quality))
    assert np.abs(ours - np.stack(decoded) / 255).mean() < 0.01


def test_elastic_transform_matches_scipy_reference():
  """Same uniform draws as the JAX code, warped with scipy (cv2.warpAffine = mirror mode)."""
  images = random_images(COLOR)
  severity, size = 4, 32
  alpha, sigma, jitter = (f * size for f in blur.ELASTIC_TRANSFORM[severity - 1])
  out = run("elastic_transform", images, severity)
  for i in (0, 3):
    draws = np.asarray(jax.random.uniform(jax.random.fold_in(KEY, i), (6 + 2 * size * size,),
                                          minval=-1.0, maxval=1.0), np.float64)
    center, half = size // 2, size // 3
    source = np.float64([[center + half] * 2, [center + half, center - half], [center - half] * 2])
    moved = source + jitter * draws[:6].reshape(3, 2)
    inverse = np.linalg.solve(np.hstack([moved, np.ones((3, 1))]), source)  # (x, y, 1) -> (x, y)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    src = np.stack([xs, ys, np.ones_like(xs)], -1) @ inverse
    warped = np.stack([ndi.map_coordinates(images[i, ..., c], [src[..., 1], src[..., 0]], order=1,
                                           mode="mirror") for c in range(3)], -1)
    fields = draws[6:].reshape(2, size, size)
    dx, dy = (ndi.gaussian_filter(f, sigma, mode="reflect", truncate=3) * alpha for f in fields)
    expected = np.stack([ndi.map_coordinates(warped[..., c], [ys + dy, xs + dx], order=1,
                                             mode="reflect") for c in range(3)], -1)
    np.testing.assert_allclose(out[i], np.clip(expected, 0, 1), atol=1e-4)


@pytest.mark.slow
def test_corrupt_dataset_is_independent_of_batch_size():
  images = random_images((10, 8, 8, 1))
  whole = run("gaussian_noise", images, 2)
  for batch_size in (3, 4, 16):
    out = corrupt_dataset(KEY, images, "gaussian_noise", 2, batch_size=batch_size)
    assert out.shape == images.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, whole, atol=1e-6)


@pytest.mark.parametrize("call, expected", [
    (lambda: corrupt(KEY, random_images(COLOR), "fogg", 1),
     "shift.corruptions='fogg' is not valid; choose one of: gaussian_noise, shot_noise"),
    (lambda: corrupt(KEY, random_images(COLOR), "contrast", 0),
     "shift.severities=0 is not valid; choose one of: 1, 2, 3, 4, 5"),
    (lambda: corrupt(KEY, random_images(COLOR), "contrast", 6), "shift.severities=6"),
    (lambda: corrupt(KEY, random_images(COLOR), "contrast", 2.0), "shift.severities=2.0"),
    (lambda: CORRUPTIONS["gaussian_blur"](KEY, random_images(COLOR), 6), "shift.severities=6"),
    (lambda: corrupt_dataset(KEY, random_images(COLOR), "fogg", 1), "shift.corruptions"),
    (lambda: corrupt_dataset(KEY, random_images(COLOR), "contrast", 1, batch_size=0),
     "shift.batch_size must be an integer > 0, got 0"),
    (lambda: save_preview_grid("unused.png", random_images(COLOR), KEY, ["fogg"]),
     "shift.corruptions"),
])
def test_bad_names_and_severities_give_one_line_config_errors(call, expected):
  with pytest.raises(ConfigError) as error:
    call()
  assert expected in one_line(error)


def test_preview_grid_writes_a_png_with_the_grid_aspect(tmp_path):
  path = tmp_path / "preview.png"
  save_preview_grid(path, random_images((1, 8, 8, 1)), KEY, ["contrast", "pixelate"], (1, 2))
  image = matplotlib.image.imread(path)
  rows, cols = 2, 3
  width = preview.LABEL_INCHES + preview.CELL_INCHES * cols
  height = preview.TITLE_INCHES + preview.CELL_INCHES * rows
  assert image.shape[1] / image.shape[0] == pytest.approx(width / height, rel=0.03)
  assert image[..., :3].std() > 0.05
  assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]  # no temporary file left

"""Image classification data from a folder tree: root/<class_name>/<image files>.

Classes are the sorted sub-folder names (hidden folders skipped) and files are read in sorted
order, so labels and example order are reproducible. Every image is turned upright by its EXIF
orientation, converted to RGB (or to one-channel grayscale with `data.grayscale`), scaled to
[0, 1] by its mode's true range (8-bit modes by 255, 16-bit by 65535, float images as they are)
and resized with bilinear filtering to `data.image_size` squared; animated images contribute
their first frame. Alpha is dropped (as PIL's `convert` does). What cannot be read faithfully (an
unreadable file, 32-bit integers beyond 16 bits, floats outside [0, 1]) is a one-line DataError
naming the file.
"""
from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image, ImageOps

from adcorda_jax.data.dataset import DATASETS, RawSplits, Split
from adcorda_jax.errors import ConfigError, DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
_DEFAULT_IMAGE_SIZE = 32


def class_folders(root: Path) -> dict[str, Path]:
  """Maps each class name to its folder under `root`, sorted by name."""
  if not root.is_dir():
    raise DataError(f"image folder {root} does not exist or is not a directory")
  folders = {entry.name: entry for entry in sorted(root.iterdir())
             if entry.is_dir() and not entry.name.startswith(".")}
  if not folders:
    raise DataError(f"image folder {root} has no class sub-folders (expected "
                    f"{root}/<class_name>/<images>)")
  return folders


def image_files(folder: Path) -> list[Path]:
  """Image files directly inside `folder`, sorted; suffixes are matched case-insensitively."""
  return sorted(entry for entry in folder.iterdir()
                if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES)


# Modes PIL converts exactly to 8-bit L/RGB (palette, bilevel, alpha, CMYK, YCbCr, LAB, HSV).
_EIGHT_BIT_MODES = frozenset({"1", "L", "P", "LA", "PA", "La", "RGB", "RGBA", "RGBa", "RGBX",
                              "CMYK", "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# ITU-R 601-2 luma, the weights of PIL's own RGB -> L conversion.
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def _wide_pixels(image: Image.Image, path: Path) -> np.ndarray:
  """HW float32 in [0, 1] of a 16-bit, 32-bit integer or float image."""
  pixels = np.asarray(image)
  if image.mode in _SIXTEEN_BIT_MODES:
    return pixels.astype(np.float32) / np.float32(65535.0)
  if image.mode == "I":  # 16-bit PNG/TIFF data widened to int32 by the decoder.
    if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
      raise DataError(f"cannot read image {path}: 32-bit integer pixels outside [0, 65535] "
                      "have no known range; save it as 8- or 16-bit")
    return pixels.astype(np.float32) / np.float32(65535.0)
  pixels = pixels.astype(np.float32)  # Mode F.
  if pixels.size and not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
    raise DataError(f"cannot read image {path}: float pixels outside [0, 1] (range "
                    f"{pixels.min():g}..{pixels.max():g}); rescale it or save it as 8/16-bit")
  return pixels


def _resize_float(pixels: np.ndarray, image_size: int) -> np.ndarray:
  """Bilinear resize of an HW float image (PIL's mode F keeps full precision)."""
  resized = Image.fromarray(pixels, mode="F").resize((image_size, image_size),
                                                    Image.Resampling.BILINEAR)
  return np.clip(np.asarray(resized, np.float32), 0.0, 1.0)


def read_image(path: Path, image_size: int, grayscale: bool) -> np.ndarray:
  """Reads one image as float32 HWC in [0, 1], resized to image_size x image_size."""
  try:
    with Image.open(path) as opened:
      image = ImageOps.exif_transpose(opened)
      if image.mode in _EIGHT_BIT_MODES:
        image = image.convert("L" if grayscale else "RGB")
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, np.float32) / np.float32(255.0)
      elif image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        gray = _resize_float(_wide_pixels(image, path), image_size)
        pixels = gray if grayscale else np.repeat(gray[..., np.newaxis], 3, axis=-1)
      else:
        raise DataError(f"cannot read image {path}: PIL mode {image.mode!r} is not supported; "
                        "save it as 8- or 16-bit grayscale or RGB")
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise DataError(f"cannot read image {path}: {reason}") from None
  return pixels[..., np.newaxis] if grayscale else pixels


def read_tree(root: Path, class_names: tuple[str, ...], image_size: int, grayscale: bool,
              require_every_class: bool) -> Split:
  """Reads all images under `root`, labelling each by its folder's index in `class_names`."""
  images, labels = [], []
  for label, class_name in enumerate(class_names):
    files = image_files(root / class_name)
    if require_every_class and not files:
      raise DataError(f"class folder {root / class_name} contains no images "
                      f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    images.extend(read_image(path, image_size, grayscale) for path in files)
    labels.extend([label] * len(files))
  if not images:
    raise DataError(f"image folder {root} contains no images in its class sub-folders")
  return Split(np.stack(images), np.asarray(labels, np.int32))


@DATASETS.register("image_folder")
def load_image_folder(data_config: ml_collections.ConfigDict) -> RawSplits:
  """Loads data.data_dir (train) and the optional data.test_dir (test, same class folders)."""
  data_dir = data_config.get("data_dir", "")
  if not data_dir:
    raise ConfigError("data.data_dir must name the image folder root for data.name=image_folder")
  image_size = data_config.get("image_size", _DEFAULT_IMAGE_SIZE)
  grayscale = bool(data_config.get("grayscale", False))
  root = Path(data_dir)
  class_names = tuple(class_folders(root))
  train = read_tree(root, class_names, image_size, grayscale, require_every_class=True)
  test = None
  test_dir = data_config.get("test_dir", "")
  if test_dir:
    test_root = Path(test_dir)
    test_classes = tuple(class_folders(test_root))
    if test_classes != class_names:
      missing = sorted(set(class_names) - set(test_classes))
      extra = sorted(set(test_classes) - set(class_names))
      raise DataError(f"test folder {test_root} has different classes than {root}: "
                      f"missing {missing}, extra {extra}")
    test = read_tree(test_root, class_names, image_size, grayscale, require_every_class=False)
  return train, test, class_names

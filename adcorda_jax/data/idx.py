"""MNIST and Fashion-MNIST from IDX files (gzipped or raw), with a TFDS fallback.

Local IDX files are searched in order: `data.data_dir` (if set it must hold the files), the
`ADCORDA_MNIST_DIR` / `ADCORDA_FASHION_MNIST_DIR` environment variable (same rule), then the
folder installed by a Debian package (`apt-get install dataset-fashion-mnist` puts Fashion-MNIST
in /usr/share/datasets/fashion-mnist; Debian has no MNIST package). Without local files the
dataset is read from TFDS (downloaded there when `data.tfds_download` is True).
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import zlib
from pathlib import Path

import ml_collections
import numpy as np

from adcorda_jax.data import tfds_source
from adcorda_jax.data.dataset import DATASETS, RawSplits, Split
from adcorda_jax.errors import DataError

# IDX type codes (third header byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_HEADER_BYTES = 4
_DIM_BYTES = 4
_NUM_CLASSES = 10


@dataclasses.dataclass(frozen=True)
class IdxSource:
  """Where to find one IDX dataset and how to tell the user to get it."""
  name: str
  env_var: str
  package_dirs: tuple[str, ...]
  class_names: tuple[str, ...]
  how_to_install: str


MNIST = IdxSource(
    name="mnist", env_var="ADCORDA_MNIST_DIR", package_dirs=(),
    class_names=tuple(str(digit) for digit in range(10)), how_to_install="")
FASHION_MNIST = IdxSource(
    name="fashion_mnist", env_var="ADCORDA_FASHION_MNIST_DIR",
    package_dirs=("/usr/share/datasets/fashion-mnist",),
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
    how_to_install=("install the Debian package with `apt-get install dataset-fashion-mnist` "
                    "(IDX files in /usr/share/datasets/fashion-mnist), "))


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Parses one IDX file (gzip-compressed if its name ends in .gz) into a numpy array.

  The header is magic (two zero bytes, a type code, the number of dimensions) followed by one
  big-endian uint32 per dimension; the payload must have exactly the size the header promises.
  """
  path = Path(path)
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as stream:
        content = stream.read()
    else:
      content = path.read_bytes()
  except (OSError, EOFError, zlib.error) as error:
    raise DataError(f"cannot read IDX file {path}: {error}") from error
  if len(content) < _HEADER_BYTES or content[0] != 0 or content[1] != 0:
    raise DataError(f"IDX file {path} is corrupt: bad magic number")
  type_code, ndim = content[2], content[3]
  if type_code not in _IDX_DTYPES or ndim == 0:
    raise DataError(f"IDX file {path} is corrupt: unknown type code {type_code:#x} or ndim {ndim}")
  data_start = _HEADER_BYTES + _DIM_BYTES * ndim
  if len(content) < data_start:
    raise DataError(f"IDX file {path} is truncated: header cut short")
  shape = tuple(int(size) for size in np.frombuffer(content, ">u4", ndim, _HEADER_BYTES))
  dtype = np.dtype(_IDX_DTYPES[type_code])
  expected = data_start + int(np.prod(shape)) * dtype.itemsize
  if len(content) != expected:
    problem = "truncated" if len(content) < expected else "corrupt (trailing bytes)"
    raise DataError(f"IDX file {path} is {problem}: {len(content)} bytes, expected {expected} "
                    f"for shape {shape}")
  array = np.frombuffer(content, dtype, offset=data_start).reshape(shape)
  return array.astype(dtype.newbyteorder("="))  # Native byte order for fast arithmetic.


def _find_file(directory: Path, prefix: str, kind: str, ndim: int) -> Path | None:
  """Finds e.g. train-images-idx3-ubyte[.gz] (or the train-images.idx3-ubyte spelling)."""
  for separator in ("-", "."):
    for suffix in (".gz", ""):
      candidate = directory / f"{prefix}-{kind}{separator}idx{ndim}-ubyte{suffix}"
      if candidate.is_file():
        return candidate
  return None


def _idx_files(directory: Path) -> dict[str, Path] | None:
  """Returns the four IDX files in `directory` by role, or None if any is missing."""
  files = {}
  for role, prefix in (("train", "train"), ("test", "t10k")):
    images = _find_file(directory, prefix, "images", 3)
    labels = _find_file(directory, prefix, "labels", 1)
    if images is None or labels is None:
      return None
    files[f"{role}_images"], files[f"{role}_labels"] = images, labels
  return files


def _load_pair(images_path: Path, labels_path: Path) -> Split:
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise DataError(f"IDX file {images_path} must hold uint8 images of shape [N, H, W], got "
                    f"{images.dtype} {images.shape}")
  if labels.ndim != 1 or len(labels) != len(images):
    raise DataError(f"IDX file {labels_path} must hold {len(images)} labels, got shape "
                    f"{labels.shape}")
  if len(labels) and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
    raise DataError(f"IDX file {labels_path} has labels outside [0, {_NUM_CLASSES})")
  scaled = images.astype(np.float32)
  scaled /= np.float32(255.0)
  return Split(scaled[..., np.newaxis], labels.astype(np.int32))


def load_idx_dir(directory: str | os.PathLike, source: IdxSource) -> RawSplits:
  """Loads train/test from the four standard IDX files in `directory`."""
  directory = Path(directory)
  files = _idx_files(directory)
  if files is None:
    raise DataError(
        f"{source.name}: {directory} does not contain the IDX files train-images-idx3-ubyte, "
        f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or raw); "
        f"{source.how_to_install}or set data.data_dir='' to search the default places")
  train = _load_pair(files["train_images"], files["train_labels"])
  test = _load_pair(files["test_images"], files["test_labels"])
  return train, test, source.class_names


def _local_dir(data_config: ml_collections.ConfigDict, source: IdxSource) -> Path | None:
  """The folder to read IDX files from, or None to fall back to TFDS; see module docstring."""
  data_dir = data_config.get("data_dir", "")
  if data_dir:
    return Path(data_dir)
  from_env = os.environ.get(source.env_var, "")
  if from_env:
    if _idx_files(Path(from_env)) is None:
      raise DataError(f"{source.name}: ${source.env_var}={from_env} does not contain the IDX "
                      f"files (train-images-idx3-ubyte[.gz], ...); fix or unset it")
    return Path(from_env)
  for package_dir in source.package_dirs:
    if _idx_files(Path(package_dir)) is not None:
      return Path(package_dir)
  return None


def load_idx_dataset(data_config: ml_collections.ConfigDict, source: IdxSource) -> RawSplits:
  """Loads `source` from local IDX files if found, else from TFDS."""
  directory = _local_dir(data_config, source)
  if directory is not None:
    return load_idx_dir(directory, source)
  try:
    train, test, _ = tfds_source.load_tfds(source.name, data_config)
  except DataError as error:
    raise DataError(
        f"{source.name} not found: {source.how_to_install}set data.data_dir or "
        f"{source.env_var} to a folder with the IDX files, or let TFDS download "
        f"{source.name!r} (data.tfds_download=True, needs internet) [TFDS: {error}]") from error
  return train, test, source.class_names


@DATASETS.register("mnist")
def load_mnist(data_config: ml_collections.ConfigDict) -> RawSplits:
  """MNIST handwritten digits, 60k/10k 28x28x1 images, classes '0'..'9'."""
  return load_idx_dataset(data_config, MNIST)


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(data_config: ml_collections.ConfigDict) -> RawSplits:
  """Fashion-MNIST clothing images, 60k/10k 28x28x1 images, 10 named classes."""
  return load_idx_dataset(data_config, FASHION_MNIST)

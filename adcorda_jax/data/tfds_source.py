"""TensorFlow Datasets (TFDS) image-classification datasets, read without TensorFlow.

Datasets are read through TFDS's random-access data sources (ArrayRecord files), which need no
TensorFlow at read time. Split choice:

* `train` and `test` both present: used as train and test.
* `train` without `test`: `validation` (if present) is the test split, else the test split is
  carved from train by `load_dataset`.
* no `train` (e.g. `cifar10_corrupted/*` only has `test`): the first of `test`, `validation` or
  any other split becomes the only source, and `load_dataset` carves val and test from it.
* metadata lists no splits at all (only under `tfds.testing.mock_data`, where split metadata is
  unknown): `train` and `test` are requested directly.
"""
from __future__ import annotations

import functools
import socket

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from adcorda_jax.data.dataset import RawSplits, Split
from adcorda_jax.errors import AdcordaError, DataError

_FALLBACK_TEST_SPLITS = ("test", "validation")
_MAX_REASON_CHARS = 300
# Where TFDS fetches prepared datasets and many sources from; probed once before a download.
_PROBE_HOST, _PROBE_TIMEOUT_SECONDS = "storage.googleapis.com", 3.0


def network_available(host: str = _PROBE_HOST, timeout: float = _PROBE_TIMEOUT_SECONDS) -> bool:
  """Whether `host` answers on port 443 within `timeout`: TFDS itself retries for minutes."""
  try:
    with socket.create_connection((host, 443), timeout=timeout):
      return True
  except OSError:
    return False


@functools.cache
def builder_names() -> frozenset[str]:
  """Names of the TFDS builders shipped with the installed package (no network access)."""
  return frozenset(tfds.list_builders(with_community_datasets=False))


def _one_line(error: BaseException) -> str:
  text = " ".join(f"{type(error).__name__}: {error}".split())
  return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + "..."


def _downloads(builder) -> bool:
  """Whether `download_and_prepare` is TFDS's own (it is replaced under tfds.testing.mock_data)."""
  module = getattr(builder.download_and_prepare, "__module__", "") or ""
  return module.startswith("tensorflow_datasets.core")


def _how_to_prepare(name: str) -> str:
  return (f"prepare it with data.tfds_download=True on a machine with internet, or "
          f"`tfds build {name.split('/')[0]} --file_format=array_record`")


def _choose_splits(available: list[str]) -> tuple[str, str | None]:
  """Returns (train split name, test split name or None); see the module docstring."""
  if not available:
    return "train", "test"
  if "train" in available:
    test = next((name for name in _FALLBACK_TEST_SPLITS if name in available), None)
    return "train", test
  only = next((name for name in _FALLBACK_TEST_SPLITS if name in available), sorted(available)[0])
  return only, None


def _read_source(source, name: str, split: str) -> Split:
  """Reads every record of a TFDS data source into a float32 [0, 1] Split."""
  count = len(source)
  if count == 0:
    raise DataError(f"TFDS dataset {name!r} split {split!r} is empty")
  first = source[0]
  image_shape = np.shape(first["image"])
  images = np.empty((count, *image_shape), np.float32)
  labels = np.empty(count, np.int32)
  for index in range(count):
    # Indexing one record at a time works for every data source (real and mocked).
    example = first if index == 0 else source[index]
    image = np.asarray(example["image"])
    if image.shape != image_shape:
      raise DataError(f"TFDS dataset {name!r} split {split!r} has images of different shapes "
                      f"{image_shape} and {image.shape}; use a fixed-size dataset")
    images[index] = image
    labels[index] = int(example["label"])
  images /= np.float32(255.0)
  return Split(images, labels)


def _check_features(builder, name: str) -> tuple[str, ...]:
  """Verifies the dataset has a fixed-size uint8 'image' and a class 'label'; returns names."""
  features = builder.info.features
  keys = sorted(features.keys())
  if "image" not in features or "label" not in features:
    raise DataError(f"TFDS dataset {name!r} has features {keys}; an image classification "
                    f"dataset with 'image' and 'label' features is required")
  image_shape = features["image"].shape
  if len(image_shape) != 3 or any(size is None for size in image_shape):
    raise DataError(f"TFDS dataset {name!r} has variable-size images {image_shape}; only "
                    f"fixed-size image datasets can be loaded (use data.name=image_folder)")
  names = getattr(features["label"], "names", None)
  if not names:
    raise DataError(f"TFDS dataset {name!r}: feature 'label' is not a ClassLabel")
  return tuple(str(label) for label in names)


def load_tfds(name: str, data_config: ml_collections.ConfigDict) -> RawSplits:
  """Loads TFDS dataset `name` (e.g. "cifar10" or "cifar10_corrupted/gaussian_noise_5")."""
  data_dir = data_config.get("tfds_data_dir", "") or None
  download = bool(data_config.get("tfds_download", True))
  where = data_dir or "the TFDS default data dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    where = str(builder.data_dir) if data_dir is None else data_dir
    if not builder.is_prepared():
      if not download:
        raise DataError(f"TFDS dataset {name!r} is not prepared in {where} and "
                        f"data.tfds_download is False; {_how_to_prepare(name)}")
      if _downloads(builder) and not network_available():
        raise DataError(f"TFDS dataset {name!r} is not prepared in {where} and there is no "
                        f"network to download it; set data.tfds_data_dir to a folder where it "
                        f"is prepared, or data.tfds_download=False to fail at once, or "
                        f"{_how_to_prepare(name)}")
      builder.download_and_prepare()
    class_names = _check_features(builder, name)
    train_split, test_split = _choose_splits(list(builder.info.splits.keys()))
    train = _read_source(builder.as_data_source(split=train_split), name, train_split)
    test = None
    if test_split is not None:
      test = _read_source(builder.as_data_source(split=test_split), name, test_split)
  except AdcordaError:
    raise
  except Exception as error:  # TFDS raises many types (network, missing files, formats).
    raise DataError(f"could not load TFDS dataset {name!r} (data dir {where}): "
                    f"{_one_line(error)}; {_how_to_prepare(name)}") from error
  return train, test, class_names

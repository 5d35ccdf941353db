"""Datasets as in-memory numpy splits, chosen by `config.data.name`.

`load_dataset` validates `config.data`, loads the named source (a local loader from `DATASETS`
or any TFDS image-classification builder), carves stratified val (and test, when the source has
none) splits deterministically from the seed, and computes normalization statistics.
"""
from __future__ import annotations

import difflib
import functools

import ml_collections

from adcorda_jax import config_checks
from adcorda_jax.data import digits, idx, image_folder, splits, tfds_source  # Register loaders.
from adcorda_jax.data.augment import random_crop_flip
from adcorda_jax.data.dataset import DATASETS, Dataset, Loader, Split
from adcorda_jax.errors import ConfigError

__all__ = ["DATASETS", "Dataset", "Split", "load_dataset", "random_crop_flip"]

_PREFIX = "data"
_DEFAULT_NAME = "digits"
_STRING_KEYS = ("data_dir", "test_dir", "tfds_data_dir")
_BOOL_KEYS = ("grayscale", "tfds_download")


def _check_config(data_config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ConfigError naming the first invalid `data.*` field."""
  config_checks.fraction(data_config, "val_fraction", _PREFIX, default=0.1)
  test_fraction = config_checks.fraction(data_config, "test_fraction", _PREFIX, default=0.2)
  if test_fraction == 0:
    raise ConfigError(f"data.test_fraction must be in (0, 1), got {test_fraction!r}")
  config_checks.positive_int(data_config, "max_train_examples", _PREFIX, default=0,
                             allow_zero=True)
  config_checks.positive_int(data_config, "image_size", _PREFIX, default=32)
  for key in _STRING_KEYS:
    value = data_config.get(key, "")
    if not isinstance(value, str):
      raise ConfigError(f"data.{key} must be a string path ('' for none), got {value!r}")
  for key in _BOOL_KEYS:
    value = data_config.get(key, False)
    if not isinstance(value, bool):
      raise ConfigError(f"data.{key} must be True or False, got {value!r}")


def _resolve_loader(name: object) -> Loader:
  """Maps data.name to a local loader, or to TFDS for any known TFDS builder name."""
  if not isinstance(name, str) or not name:
    raise ConfigError(f"data.name must be a non-empty string, got {name!r}")
  if name in DATASETS:
    return DATASETS.get(name, "data.name")
  if name.split("/")[0] in tfds_source.builder_names():
    return functools.partial(tfds_source.load_tfds, name)
  candidates = [*DATASETS.names(), *sorted(tfds_source.builder_names())]
  hint = difflib.get_close_matches(name, candidates, n=1)
  suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
  raise ConfigError(f"unknown dataset {name!r} (data.name); valid names: "
                    f"{', '.join(DATASETS.names())}, or any TFDS builder name{suggestion}")


def load_dataset(data_config: ml_collections.ConfigDict, seed: int) -> Dataset:
  """Loads the dataset described by `data_config` with splits determined by `seed`."""
  _check_config(data_config)
  name = data_config.get("name", _DEFAULT_NAME)
  loader = _resolve_loader(name)
  train, test, class_names = loader(data_config)
  return splits.finalize(
      name, train, test, class_names,
      val_fraction=float(data_config.get("val_fraction", 0.1)),
      test_fraction=float(data_config.get("test_fraction", 0.2)),
      max_train_examples=int(data_config.get("max_train_examples", 0)),
      seed=seed)

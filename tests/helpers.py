"""Small helpers shared by the test modules."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import ml_collections
import numpy as np
import pytest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
LOCAL_DATASETS = ("digits", "fashion_mnist", "image_folder", "mnist")


def one_line(error: pytest.ExceptionInfo) -> str:
  """The message of a raised user error, asserting it is a single line."""
  message = str(error.value)
  assert "\n" not in message
  return message


def data_config(**overrides) -> ml_collections.ConfigDict:
  """A `config.data` section for digits with the given fields overridden."""
  config = ml_collections.ConfigDict({"name": "digits", "val_fraction": 0.1,
                                      "test_fraction": 0.2, "max_train_examples": 0})
  config.update(overrides)
  return config


def sorted_rows(images: np.ndarray) -> np.ndarray:
  """Images flattened to rows and sorted, to compare sets of images regardless of order."""
  rows = images.reshape(len(images), -1)
  return rows[np.lexsort(rows.T[::-1])]


def override(config, **overrides):
  """Sets dotted config fields, e.g. override(config, **{"study.rates.ptq": (8,)}); returns it."""
  for key, value in overrides.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  return config


@contextlib.contextmanager
def registered_noise_pruning() -> Iterator[Any]:
  """Registers a toy compression method, `noise_pruning`, for the duration of the block.

  It zeroes a random `rate` of every kernel's weights (seeded by the cell) and trains nothing:
  the whole method is this one class and one `register_method` call, as a new method would be.
  """
  import jax

  from adcorda_jax.compression import size_bytes
  from adcorda_jax.study import methods

  class NoisePruning(methods.CompressionMethod):
    name = "noise_pruning"
    family = "pruning"
    trains = False

    def check_rate(self, rate, key):
      methods.check_fraction(rate, key, "fractions zeroed")

    def compress(self, compressor, cell, original, settings, directory):
      key = jax.random.key(cell.seed)

      def zero_some(path, leaf):
        if jax.tree_util.keystr(path).endswith("['kernel']"):
          keep = jax.random.uniform(jax.random.fold_in(key, leaf.size), leaf.shape) >= cell.rate
          return leaf * keep
        return leaf

      params = jax.tree_util.tree_map_with_path(zero_some, original.variables["params"])
      variables = {**original.variables, "params": params}
      return methods.Compressed(original.model, variables, original.model_config,
                                size_bytes(params, sparse=True), {"zeroed": cell.rate})

  method = methods.register_method(NoisePruning())
  try:
    yield method
  finally:
    methods.COMPRESSION_METHODS.unregister("noise_pruning")

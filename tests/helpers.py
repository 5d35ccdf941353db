"""Small helpers shared by the test modules."""
from __future__ import annotations

from pathlib import Path

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

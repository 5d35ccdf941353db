"""In-memory dataset containers and the registry of named local sources.

Every source (sklearn digits, IDX files, TFDS, an image folder) is loaded fully into numpy arrays:
the datasets this library targets fit in host memory, and plain arrays make splitting, subsampling
and batching deterministic and framework-free.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
import numpy as np

from adcorda_jax.registry import Registry

# Lower bound for a channel's std: a (near-)constant channel must not blow up normalized inputs.
MIN_STD = 1e-2
_STATS_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class Split:
  """Images (float32 NHWC in [0, 1]) and their int32 class labels."""
  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    # Frozen dataclass: normalize dtypes once here so every consumer can rely on them.
    images = np.asarray(self.images, dtype=np.float32)
    labels = np.asarray(self.labels, dtype=np.int32)
    if images.ndim != 4:
      raise ValueError(f"Split.images must be NHWC (4-D), got shape {images.shape}")
    if labels.shape != (images.shape[0],):
      raise ValueError(
          f"Split.labels must have shape ({images.shape[0]},), got {labels.shape}")
    object.__setattr__(self, "images", images)
    object.__setattr__(self, "labels", labels)

  def __len__(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train/val/test splits plus what a model needs to know about the data."""
  name: str
  train: Split
  val: Split
  test: Split
  num_classes: int
  class_names: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(height, width, channels) of every image."""
    height, width, channels = self.train.images.shape[1:]
    return int(height), int(width), int(channels)


# What a raw source yields: train, test (None when the source has no test split), class names.
RawSplits = tuple[Split, Split | None, tuple[str, ...]]
Loader = Callable[[ml_collections.ConfigDict], RawSplits]

DATASETS: Registry[Loader] = Registry("dataset")


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std (floored at MIN_STD) of NHWC `images`, in float64 chunks.

  Chunking keeps the float64 temporaries small for large splits (e.g. 50k CIFAR images).
  """
  channels = images.shape[-1]
  count = int(np.prod(images.shape[:-1]))
  if count == 0:
    return (0.0,) * channels, (1.0,) * channels
  total = np.zeros(channels, np.float64)
  for start in range(0, len(images), _STATS_CHUNK):
    total += images[start:start + _STATS_CHUNK].sum(axis=(0, 1, 2), dtype=np.float64)
  mean = total / count
  squares = np.zeros(channels, np.float64)
  for start in range(0, len(images), _STATS_CHUNK):
    centered = images[start:start + _STATS_CHUNK].astype(np.float64) - mean
    squares += np.square(centered).sum(axis=(0, 1, 2))
  std = np.maximum(np.sqrt(squares / count), MIN_STD)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)

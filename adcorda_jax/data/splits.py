"""Deterministic, class-stratified carving of test/val splits and train subsampling.

All randomness comes from `np.random.default_rng((seed, purpose))`, so the same seed always gives
the same splits on every machine and Python version, and each step (test carve, val carve,
subsample) draws from its own stream: changing `val_fraction` does not reshuffle the test split.
"""
from __future__ import annotations

import numpy as np

from adcorda_jax.data.dataset import Dataset, Split, channel_stats
from adcorda_jax.errors import ConfigError, DataError

_TEST_STREAM, _VAL_STREAM, _SUBSAMPLE_STREAM = 0, 1, 2


def _rng(seed: int, stream: int) -> np.random.Generator:
  # SeedSequence needs non-negative entries; the modulo keeps negative seeds usable and distinct.
  return np.random.default_rng((int(seed) % 2**63, stream))


def stratified_pick(labels: np.ndarray, count: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Splits indices of `labels` into (rest, picked) with exactly `count` picked.

  Each class contributes its proportional share of `count` (largest-remainder rounding, ties
  broken at random), so every class keeps roughly its frequency in both parts. Both index arrays
  are sorted, preserving the source order.
  """
  num_examples = len(labels)
  if not 0 <= count <= num_examples:
    raise ValueError(f"count must be in [0, {num_examples}], got {count}")
  classes, inverse = np.unique(labels, return_inverse=True)
  sizes = np.bincount(inverse, minlength=len(classes))
  quotas = sizes * (count / max(num_examples, 1))
  shares = np.floor(quotas).astype(np.int64)
  leftover = count - int(shares.sum())
  order = rng.permutation(len(classes))
  by_remainder = order[np.argsort(-(quotas - shares)[order], kind="stable")]
  shares[by_remainder[:leftover]] += 1
  picked = [rng.permutation(np.flatnonzero(inverse == index))[:share]
            for index, share in enumerate(shares)]
  picked = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
  mask = np.ones(num_examples, bool)
  mask[picked] = False
  return np.flatnonzero(mask), picked


def _subset(split: Split, indices: np.ndarray) -> Split:
  return Split(split.images[indices], split.labels[indices])


def carve(split: Split, fraction: float, seed: int, stream: int) -> tuple[Split, Split]:
  """Returns (rest, carved) where `carved` holds round(fraction * N) examples, stratified."""
  count = int(round(fraction * len(split)))
  rest, picked = stratified_pick(split.labels, count, _rng(seed, stream))
  return _subset(split, rest), _subset(split, picked)


def subsample(split: Split, max_examples: int, seed: int) -> Split:
  """Keeps a stratified, deterministic `max_examples` subset (all when 0 or already smaller)."""
  if max_examples == 0 or max_examples >= len(split):
    return split
  _, picked = stratified_pick(split.labels, max_examples, _rng(seed, _SUBSAMPLE_STREAM))
  return _subset(split, picked)


def _check_labels(name: str, split_name: str, split: Split, num_classes: int) -> None:
  if len(split) and (split.labels.min() < 0 or split.labels.max() >= num_classes):
    raise DataError(
        f"dataset {name!r}: {split_name} labels must be in [0, {num_classes}), got "
        f"[{split.labels.min()}, {split.labels.max()}]")


def finalize(name: str, train: Split, test: Split | None, class_names: tuple[str, ...], *,
             val_fraction: float, test_fraction: float, max_train_examples: int,
             seed: int) -> Dataset:
  """Carves test (if missing) and val from `train`, subsamples, and computes normalization stats.

  Stats come from the final train split only, so nothing about val/test leaks into the model.
  """
  num_classes = len(class_names)
  for split_name, split in (("train", train), ("test", test)):
    if split is not None:
      _check_labels(name, split_name, split, num_classes)
  if test is not None and test.images.shape[1:] != train.images.shape[1:]:
    raise DataError(f"dataset {name!r}: test images have shape {test.images.shape[1:]} but "
                    f"train images have {train.images.shape[1:]}")
  if test is None:
    train, test = carve(train, test_fraction, seed, _TEST_STREAM)
    if len(test) == 0:
      raise ConfigError(f"data.test_fraction={test_fraction} leaves no test examples out of "
                        f"{len(train)} in dataset {name!r}")
  train, val = carve(train, val_fraction, seed, _VAL_STREAM)
  if len(train) == 0:
    raise ConfigError(f"data.val_fraction={val_fraction} leaves no training examples in "
                      f"dataset {name!r}")
  train = subsample(train, max_train_examples, seed)
  mean, std = channel_stats(train.images)
  return Dataset(name=name, train=train, val=val, test=test, num_classes=num_classes,
                 class_names=tuple(class_names), mean=mean, std=std)

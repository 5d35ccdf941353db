"""Accuracy under distribution shift: corrupted test images and other domains with the same classes.

    shift.corruptions = "all"         # or "gaussian_noise,contrast,..." (adcorda_jax.shift)
    shift.severities = (1, 2, 3, 4, 5)
    shift.max_examples = 1000         # first N test images are corrupted (0 = all)
    shift.domains.<name> = <a data config>   # e.g. another image_folder domain (Office-31)

The corrupted sets depend only on the data and the key, so they are built once per run and every
network is scored on the same images. A domain is any dataset `data.load_dataset` reads (an image
folder, a TFDS name such as `cifar10_corrupted/fog_3`) whose classes and image shape match; all
its images (every split) are evaluated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from adcorda_jax import config_checks
from adcorda_jax.data import Dataset, load_dataset
from adcorda_jax.errors import ConfigError
from adcorda_jax.progress import Progress
from adcorda_jax.shift import SEVERITIES, corrupt_dataset, corruption_names
from adcorda_jax.shift.corruptions import check_name

Predictor = Callable[[Any, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class ShiftSettings:
  """The validated `shift` section."""
  corruptions: tuple[str, ...]
  severities: tuple[int, ...]
  max_examples: int
  batch_size: int
  domains: dict[str, ml_collections.ConfigDict]


def read_shift_settings(config: ml_collections.ConfigDict, channels: int) -> ShiftSettings:
  """Checks `config.shift` for images with `channels` channels; ConfigErrors name the key."""
  section = config.get("shift")
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError("config has no 'shift' section; start from configs/compression_digits.py")
  text = section.get("corruptions", "all")
  if not isinstance(text, str):
    raise ConfigError(f"shift.corruptions must be 'all' or a comma-separated string, got {text!r}")
  available = corruption_names(channels)
  if text.strip() == "all":
    names = tuple(available)
  else:
    names = tuple(check_name(n.strip()) for n in text.split(",") if n.strip())
    for name in names:
      if name not in available:
        raise ConfigError(f"shift.corruptions: {name!r} needs colour images; these have "
                          f"{channels} channel(s)")
  severities = section.get("severities", SEVERITIES)
  if (not isinstance(severities, (tuple, list)) or not severities
      or any(s not in SEVERITIES for s in severities) or len(set(severities)) != len(severities)):
    raise ConfigError(f"shift.severities must be distinct values from 1..5, got {severities!r}")
  domains = section.get("domains") or ml_collections.ConfigDict()
  if not isinstance(domains, ml_collections.ConfigDict) or any(
      not isinstance(d, ml_collections.ConfigDict) for d in domains.values()):
    raise ConfigError("shift.domains must map names to data configs (like the `data` section)")
  if not names and not len(domains):
    raise ConfigError("shift.corruptions is empty and shift.domains names none: nothing to shift")
  return ShiftSettings(
      corruptions=names, severities=tuple(int(s) for s in severities),
      max_examples=config_checks.positive_int(section, "max_examples", "shift", default=1000,
                                              allow_zero=True),
      batch_size=config_checks.positive_int(section, "batch_size", "shift", default=500),
      domains=dict(domains.items()))


@dataclasses.dataclass(frozen=True)
class ShiftedSets:
  """Every shifted test set of a run: corrupted copies and other domains, with labels."""
  corrupted: dict[tuple[str, int], np.ndarray]
  corrupted_labels: np.ndarray
  domains: dict[str, tuple[np.ndarray, np.ndarray]]


def build_shifted_sets(settings: ShiftSettings, dataset: Dataset, key: jax.Array,
                       seed: int) -> ShiftedSets:
  """Corrupts the first `max_examples` test images at each (corruption, severity); loads domains."""
  count = len(dataset.test) if settings.max_examples == 0 else min(settings.max_examples,
                                                                   len(dataset.test))
  images = dataset.test.images[:count]
  corrupted = {}
  progress = Progress(len(settings.corruptions) * len(settings.severities), "corrupt test set",
                      unit="set")
  for index, name in enumerate(settings.corruptions):
    for severity in settings.severities:
      corrupted[(name, severity)] = corrupt_dataset(
          jax.random.fold_in(key, index), images, name, severity, batch_size=settings.batch_size)
      progress.update(1)
  progress.close()
  domains = {}
  for name, data_config in settings.domains.items():
    target = load_dataset(data_config, seed)
    if target.num_classes != dataset.num_classes or target.image_shape != dataset.image_shape:
      raise ConfigError(
          f"shift.domains.{name}: {target.num_classes} classes of {target.image_shape} images, "
          f"but the networks were trained on {dataset.num_classes} classes of "
          f"{dataset.image_shape}; a domain must share classes and image size")
    splits = [split for split in (target.train, target.val, target.test) if len(split)]
    domains[name] = (np.concatenate([s.images for s in splits]),
                     np.concatenate([s.labels for s in splits]))
    logging.info("Domain %r: %d images.", name, len(domains[name][1]))
  return ShiftedSets(corrupted=corrupted, corrupted_labels=dataset.test.labels[:count],
                     domains=domains)


def shift_accuracy(predict: Predictor, variables: Any, sets: ShiftedSets) -> dict[str, Any]:
  """Accuracy on every shifted set, with the mean over corruptions and severities."""
  by_corruption: dict[str, dict[str, float]] = {}
  for (name, severity), images in sets.corrupted.items():
    accuracy = float(np.mean(predict(variables, images) == sets.corrupted_labels))
    by_corruption.setdefault(name, {})[str(severity)] = accuracy
  per_corruption = {name: float(np.mean(list(v.values()))) for name, v in by_corruption.items()}
  domains = {name: float(np.mean(predict(variables, images) == labels))
             for name, (images, labels) in sets.domains.items()}
  return {"corruption_mean": (float(np.mean(list(per_corruption.values())))
                              if per_corruption else None),
          "per_corruption": per_corruption, "by_severity": by_corruption, "domains": domains,
          "corrupted_examples": int(len(sets.corrupted_labels))}

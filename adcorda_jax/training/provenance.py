"""Which data a checkpoint was trained on, and whether a config's data agrees with it.

A checkpoint's `meta` names its dataset, classes and image shape; the training run's own
`config.json` beside it holds the exact `data` section and seed, so a later stage can rebuild the
very split the model was trained and held out on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from adcorda_jax import workdir as workdir_lib
from adcorda_jax.data import Dataset
from adcorda_jax.errors import CheckpointError, ConfigError
from adcorda_jax.training import checkpointing

# The `data` keys that decide which examples land in which split (with load_dataset's defaults);
# the location keys (data_dir, ...) may differ between machines.
IDENTITY_DEFAULTS = {"name": "digits", "val_fraction": 0.1, "test_fraction": 0.2,
                     "max_train_examples": 0, "image_size": 32, "grayscale": False}
_LOCATION_KEYS = ("data_dir", "test_dir", "tfds_data_dir")


def _training_run_dir(checkpoint: Path) -> Path | None:
  """The training workdir holding `checkpoint` (a workdir, its checkpoints/ or a step folder)."""
  for candidate in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
    if ((candidate / workdir_lib.CONFIG_FILE).is_file()
        and (candidate / checkpointing.CHECKPOINT_DIR).is_dir()):
      return candidate
  return None


def training_data(checkpoint: Path, meta: dict[str, Any],
                  data_dir: str) -> tuple[ml_collections.ConfigDict, int, str]:
  """(data config, seed, description) of the data the checkpoint was trained on."""
  run_dir = _training_run_dir(checkpoint)
  if run_dir is not None:
    run_config = workdir_lib.read_json(run_dir / workdir_lib.CONFIG_FILE)
    data, seed = dict(run_config.get("data") or {}), run_config.get("seed", 0)
    source = f"`data` and seed {seed} from the training run's {run_dir / 'config.json'}"
  else:
    data, seed = {"name": meta["dataset"]}, 0
    source = (f"{meta['dataset']} with default split fractions and seed 0 (no training "
              "config.json found beside the checkpoint)")
    logging.warning("No training config.json beside %s; assuming %s.", checkpoint, source)
  if data.get("name", "digits") != meta["dataset"]:
    raise CheckpointError(
        f"checkpoint {str(checkpoint)!r} was trained on {meta['dataset']!r} but its run's "
        f"config.json says data.name={data.get('name')!r}")
  if data_dir:
    data["data_dir"] = data_dir
    source += f", data_dir overridden to {data_dir!r}"
  return ml_collections.ConfigDict(data), int(seed), source


def check_data_matches(dataset: Dataset, meta: dict[str, Any], checkpoint: Path) -> None:
  """The loaded data must have the checkpoint's image shape and class count."""
  if (list(dataset.image_shape) != list(meta["image_shape"])
      or dataset.num_classes != meta["num_classes"]):
    raise CheckpointError(
        f"checkpoint {str(checkpoint)!r} expects {meta['num_classes']} classes of images "
        f"{tuple(meta['image_shape'])}, but the data has {dataset.num_classes} of "
        f"{dataset.image_shape}")


def check_config_data(config: ml_collections.ConfigDict, checkpoint: Path,
                      meta: dict[str, Any], key: str) -> tuple[ml_collections.ConfigDict, str]:
  """(`config.data`, its provenance), checked to describe the data the checkpoint named by
  `key` was trained on.

  Refuses, naming both values, a data section or seed that would build other splits than the
  checkpoint's training run did; location keys left empty are taken from that run.
  """
  run_data, run_seed, source = training_data(checkpoint, meta, "")
  data = config.get("data") or ml_collections.ConfigDict()
  known = _training_run_dir(checkpoint) is not None
  keys = IDENTITY_DEFAULTS if known else {"name": IDENTITY_DEFAULTS["name"]}
  differing = [f"data.{k}: {run_data.get(k, d)!r} vs {data.get(k, d)!r}"
               for k, d in keys.items() if run_data.get(k, d) != data.get(k, d)]
  if known and run_seed != config.get("seed", 0):
    differing.append(f"seed: {run_seed!r} vs {config.get('seed', 0)!r}")
  if differing:
    raise ConfigError(
        f"{key}={str(checkpoint)!r} was trained on other data than this config's (checkpoint vs "
        f"config: {'; '.join(differing)}); set those keys to the checkpoint's values, or leave "
        f"{key} empty to train a baseline on config.data")
  merged = ml_collections.ConfigDict(data.to_dict())
  for location in _LOCATION_KEYS:
    if not merged.get(location) and run_data.get(location):
      merged[location] = run_data[location]
  return merged, source

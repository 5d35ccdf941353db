"""The trained float network a multi-stage task starts from, with the data it was trained on.

Either another run's checkpoint (named by a config key such as `adcorda.baseline_checkpoint`,
whose recorded training data must match `config.data`) or a `task=train` run in
`<workdir>/baseline`, trained, resumed or loaded like any run. Shared by adcorda, quantize and the
compression study.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import ml_collections

from adcorda_jax import workdir as workdir_lib
from adcorda_jax.data import Dataset, load_dataset
from adcorda_jax.pipeline import fingerprint, stage
from adcorda_jax.quant.deploy import float_model_config
from adcorda_jax.training import checkpointing, provenance, trainer

TRAIN_SECTIONS = ("seed", "data", "model", "train")  # What a baseline's fingerprint reads.


@dataclasses.dataclass(frozen=True)
class Baseline:
  """A trained float network with the exact data split it was trained on."""
  checkpoint: Path
  variables: dict[str, Any]
  meta: dict[str, Any]
  model: nn.Module
  dataset: Dataset
  data_source: str
  fingerprint: dict[str, Any]  # Config keys or path, plus `baseline.params_sha1`.


def baseline_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `task=train` config of the baseline trained in `<workdir>/baseline`.

  The baseline is always the float network: `model.quant` says how later stages quantize it.
  """
  plain = config.to_dict()
  if isinstance(plain.get("model"), dict):
    plain["model"] = float_model_config(plain["model"])
  return ml_collections.ConfigDict(
      {"task": "train", **{k: plain[k] for k in ("seed", "distributed", "cpu_devices", "data",
                                                 "model", "train") if k in plain}})


def ensure_baseline(config: ml_collections.ConfigDict, checkpoint: Path | None, key: str,
                    directory: Path) -> tuple[Path, dict[str, Any]]:
  """(checkpoint path, fingerprint) of the baseline: `checkpoint` (config key `key`) if given,
  else the float model trained (or resumed, or loaded) in `directory`."""
  if checkpoint is not None:
    return checkpoint, {key: str(checkpoint)}
  train_config = baseline_config(config)
  recorded = directory / workdir_lib.CONFIG_FILE
  if recorded.exists():
    stage.check(workdir_lib.read_json(recorded), workdir_lib.config_to_dict(train_config),
                f"stage {directory.name!r} in {str(directory)!r}",
                ignore=fingerprint.RESUMABLE_KEYS)
  trainer.train_and_evaluate(train_config, directory)
  return directory, {key: "", **fingerprint.config_keys(train_config, TRAIN_SECTIONS)}


def load_baseline(config: ml_collections.ConfigDict, checkpoint: Path | None, key: str,
                  workdir: Path) -> Baseline:
  """The baseline at `checkpoint` (config key `key`), or trained in `<workdir>/baseline`."""
  path, keys = ensure_baseline(config, checkpoint, key, workdir / "baseline")
  variables, meta = checkpointing.load_checkpoint(path)
  if checkpoint is not None:  # Another run's: config.data must describe its training data.
    data_config, data_source = provenance.check_config_data(config, path, meta, key)
  else:
    data_config, (_, _, data_source) = config.data, provenance.training_data(path, meta, "")
  dataset = load_dataset(data_config, config.get("seed", 0))
  provenance.check_data_matches(dataset, meta, path)
  keys["baseline.params_sha1"] = fingerprint.tree_digest(variables)
  return Baseline(checkpoint=path, variables=variables, meta=meta,
                  model=checkpointing.model_from_meta(meta), dataset=dataset,
                  data_source=data_source, fingerprint=keys)

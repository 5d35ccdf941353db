"""What the multi-stage tasks (adcorda, quantize, compression_study) do alike at start and end."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import flax.linen as nn
import ml_collections
from absl import logging

from adcorda_jax import workdir as workdir_lib
from adcorda_jax.adcorda import stages
from adcorda_jax.data import Dataset, load_dataset
from adcorda_jax.training import checkpointing, provenance


def open_staged_run(config: ml_collections.ConfigDict, workdir: str | Path
                    ) -> ContextManager[workdir_lib.Run]:
  """Opens (and locks) the workdir of a multi-stage task: each stage fingerprints what it reads,
  so the workdir itself refuses no config; a finished run of the same config is returned as
  `run.finished`. Keys that change only logging or checkpoint cadence do not count."""
  return workdir_lib.open_run(workdir, config, strict=False, ignore=stages.RESUMABLE_KEYS)


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


def load_baseline(config: ml_collections.ConfigDict, checkpoint: Path | None, key: str,
                  workdir: Path) -> Baseline:
  """The baseline at `checkpoint` (config key `key`), or trained in `<workdir>/baseline`."""
  path, fingerprint = stages.ensure_baseline(config, checkpoint, key, workdir)
  variables, meta = checkpointing.load_checkpoint(path)
  if checkpoint is not None:  # Another run's: config.data must describe its training data.
    data_config, data_source = provenance.check_config_data(config, path, meta, key)
  else:
    data_config, (_, _, data_source) = config.data, provenance.training_data(path, meta, "")
  dataset = load_dataset(data_config, config.get("seed", 0))
  provenance.check_data_matches(dataset, meta, path)
  fingerprint["baseline.params_sha1"] = stages.tree_digest(variables)
  return Baseline(checkpoint=path, variables=variables, meta=meta,
                  model=checkpointing.model_from_meta(meta), dataset=dataset,
                  data_source=data_source, fingerprint=fingerprint)


def evaluation_summary(evaluation: stages.Evaluation, robust_examples: int) -> dict[str, Any]:
  """The `evaluate` block of results.json: attacks, their settings, eps and example count."""
  return {"attacks": [s.name for s in evaluation.specs],
          "attack_descriptions": {s.name: s.describe() for s in evaluation.specs},
          "norm": evaluation.specs[0].norm, "eps": list(evaluation.eps),
          "robust_examples": robust_examples}


def save_results(workdir: Path, results: dict[str, Any], *, markdown: str, summary: str,
                 plots: Sequence[Callable[[], None]] = ()) -> None:
  """Writes plots, `report.md`, `config.json` and, last, `results.json` (atomically each)."""
  if workdir_lib.is_writer():
    for plot in plots:
      plot()
    workdir_lib.write_text_atomic(workdir / "report.md", markdown)
  workdir_lib.write_json_atomic(workdir / workdir_lib.CONFIG_FILE, results["config"])
  workdir_lib.write_json_atomic(workdir / workdir_lib.RESULTS_FILE, results)
  logging.info("Done: %s; results in %s", summary, workdir / workdir_lib.RESULTS_FILE)

"""Compressing one network by one method at one rate, then fine-tuning it: one study cell's model.

`Compressor` hands each cell to its method's entry in `study.methods.COMPRESSION_METHODS`
(`filter_pruning`, `magnitude_pruning`, `distillation`, `ptq`, each described in its module) with
the tools methods share: building a model for the dataset and fine-tuning with the `adapt`
recipe. Fine-tuning and distillation checkpoint into the cell's folder, so an interrupted cell
resumes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import flax.linen as nn
import ml_collections
import optax

from adcorda_jax.training import finetune, input_pipeline
from adcorda_jax.compression import flops_per_example, nonzero_parameters
from adcorda_jax.data import Dataset
from adcorda_jax.models import count_params, create_model
from adcorda_jax.study.grid import Cell
from adcorda_jax.study.methods import COMPRESSION_METHODS, Compressed, Original
from adcorda_jax.training import batches

__all__ = ["Compressed", "Compressor", "network_stats"]

# (optimizer, total fine-tuning steps) -> the optimizer fine-tuning uses (e.g. with masks).
OptimizerWrapper = Callable[[optax.GradientTransformation, int], optax.GradientTransformation]


def network_stats(model: nn.Module, variables: dict[str, Any], image_shape: tuple[int, ...]
                  ) -> dict[str, Any]:
  """Parameter count, nonzero parameters and forward FLOPs per example."""
  return {"params": int(count_params(variables["params"])),
          "nonzero_params": int(nonzero_parameters(variables["params"])),
          "flops": float(flops_per_example(model, variables, image_shape))}


@dataclasses.dataclass
class Compressor:
  """Builds each cell's compressed network from its original (teacher) network, by its method.

  `method_settings` maps each method of the study to what its `read_settings` returned
  (`methods.read_method_settings`); `build` and `finetune` are the tools methods share.
  """
  dataset: Dataset
  adapt: finetune.FinetuneSettings
  method_settings: Mapping[str, Any]
  input_settings: input_pipeline.InputSettings = input_pipeline.InputSettings()

  def build(self, model_config: dict[str, Any]) -> nn.Module:
    """The model of `model_config` for this dataset (classes and normalization)."""
    data = self.dataset
    return create_model(ml_collections.ConfigDict(model_config), data.num_classes, data.mean,
                        data.std)

  def finetune(self, model: nn.Module, variables: dict[str, Any], cell: Cell, directory: Path,
               meta: dict[str, Any], wrap_optimizer: OptimizerWrapper | None = None
               ) -> dict[str, Any]:
    """Fine-tunes with `adapt`, resumably in `directory`; returns the tuned variables."""
    train = self.dataset.train
    steps_per_epoch = batches.steps_per_epoch(len(train), self.adapt.batch_size)
    total_steps = self.adapt.epochs * steps_per_epoch
    runner = finetune.Finetuner(
        model, variables["params"], self.adapt, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, num_classes=self.dataset.num_classes,
        wrap_optimizer=(
            None if wrap_optimizer is None else lambda tx: wrap_optimizer(tx, total_steps)),
        input_settings=self.input_settings)
    result = runner.run(variables, (train.images, train.labels), None, seed=cell.seed,
                        directory=directory, meta=meta,
                        description=f"{cell.network.label} {cell.name} seed {cell.seed}")
    return result.variables

  def __call__(self, cell: Cell, model_config: dict[str, Any], model: nn.Module,
               variables: dict[str, Any], meta: dict[str, Any], directory: Path) -> Compressed:
    """The compressed (and fine-tuned) network of `cell` from the original `variables`."""
    method = COMPRESSION_METHODS.get(cell.method, "study.methods")
    if cell.method not in self.method_settings:
      raise ValueError(f"no settings were read for compression method {cell.method!r}; pass "
                       "read_method_settings(config, methods) as method_settings")
    return method.compress(self, cell, Original(model, variables, model_config, meta),
                           self.method_settings[cell.method], directory)

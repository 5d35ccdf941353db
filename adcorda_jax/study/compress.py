"""Compressing one network by one method at one rate, then fine-tuning it: one study cell's model.

* `filter_pruning` (Li et al. 2017): the lowest-L1 `rate` of each prunable layer's filters are
  removed (a physically smaller model), then fine-tuned with the `adapt` recipe.
* `magnitude_pruning`: the smallest-magnitude `rate` of kernel weights (global or per layer) are
  zeroed, at once (`one_shot`) or on Zhu & Gupta's polynomial schedule over the first 75% of
  fine-tuning (`gradual`); masks in the optimizer keep them zero.
* `distillation` (Hinton et al. 2015): a student of `rate` x the teacher's width is trained from
  scratch on the teacher's soft targets with the `distill` recipe.
* `ptq`: post-training weight quantization at `rate` bits (per-channel, `model.quant` grid).

Fine-tuning and distillation checkpoint into the cell's folder, so an interrupted cell resumes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from adcorda_jax.training import finetune
from adcorda_jax.compression import (apply_masks, flops_per_example, l1_filter_prune,
                                     magnitude_masks, masked_optimizer, nonzero_parameters,
                                     pruning_optimizer, size_bytes, sparsity_report)
from adcorda_jax.compression.distillation import DistillSettings, Distiller
from adcorda_jax.data import Dataset
from adcorda_jax.models import count_params, create_model
from adcorda_jax.quant.deploy import Quantization
from adcorda_jax.quant.fake_quant import QuantSpec
from adcorda_jax.study.grid import Cell
from adcorda_jax.training import batches


@dataclasses.dataclass(frozen=True)
class Compressed:
  """A cell's compressed network and what it costs."""
  model: nn.Module
  variables: dict[str, Any]
  model_config: dict[str, Any]
  size_bytes: int
  details: dict[str, Any]


def network_stats(model: nn.Module, variables: dict[str, Any], image_shape: tuple[int, ...]
                  ) -> dict[str, Any]:
  """Parameter count, nonzero parameters and forward FLOPs per example."""
  return {"params": int(count_params(variables["params"])),
          "nonzero_params": int(nonzero_parameters(variables["params"])),
          "flops": float(flops_per_example(model, variables, image_shape))}


@dataclasses.dataclass
class Compressor:
  """Builds each cell's compressed network from its original (teacher) network."""
  dataset: Dataset
  adapt: finetune.FinetuneSettings
  distill: DistillSettings | None
  quant_template: Quantization
  magnitude_scope: str
  magnitude_schedule: str = "one_shot"

  def _build(self, model_config: dict[str, Any]) -> nn.Module:
    data = self.dataset
    return create_model(ml_collections.ConfigDict(model_config), data.num_classes, data.mean,
                        data.std)

  def _finetune(self, model: nn.Module, variables: dict[str, Any], cell: Cell, directory: Path,
                meta: dict[str, Any], wrap_optimizer: Any = None) -> dict[str, Any]:
    """Fine-tunes with `adapt`; `wrap_optimizer(tx, total_steps)` wraps its optimizer."""
    train = self.dataset.train
    steps_per_epoch = batches.steps_per_epoch(len(train), self.adapt.batch_size)
    total_steps = self.adapt.epochs * steps_per_epoch
    runner = finetune.Finetuner(
        model, variables["params"], self.adapt, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, num_classes=self.dataset.num_classes,
        wrap_optimizer=(
            None if wrap_optimizer is None else lambda tx: wrap_optimizer(tx, total_steps)))
    result = runner.run(variables, (train.images, train.labels), None, seed=cell.seed,
                        directory=directory, meta=meta,
                        description=f"{cell.network.label} {cell.name} seed {cell.seed}")
    return result.variables

  def __call__(self, cell: Cell, model_config: dict[str, Any], model: nn.Module,
               variables: dict[str, Any], meta: dict[str, Any], directory: Path) -> Compressed:
    """The compressed (and fine-tuned) network of `cell` from the original `variables`."""
    method, rate = cell.method, cell.rate
    if method == "ptq":
      quant = self.quant_template.with_spec(
          QuantSpec(int(rate), True, self.quant_template.spec.symmetric))
      deployed = quant.ptq_variables(variables)
      return Compressed(model, deployed, model_config, quant.size_bytes(variables["params"]),
                        {"bits": int(rate), "calibration": quant.calibration})
    if method == "filter_pruning":
      pruned_config, pruned = l1_filter_prune(model_config, variables, rate)
      pruned_model = self._build(pruned_config)
      tuned = self._finetune(pruned_model, pruned, cell, directory / "finetune",
                             {**meta, "model": pruned_config})
      return Compressed(pruned_model, tuned, pruned_config, size_bytes(tuned["params"]),
                        {"channels": list(pruned_config["channels"])})
    if method == "magnitude_pruning":
      if self.magnitude_schedule == "gradual":
        start = variables
        wrap = lambda tx, total: pruning_optimizer(  # noqa: E731
            tx, final_sparsity=rate, end_step=max(1, int(0.75 * total)),
            update_every=max(1, total // 20), scope=self.magnitude_scope)
      else:
        masks = magnitude_masks(variables["params"], rate, self.magnitude_scope)
        start = {**variables, "params": apply_masks(variables["params"], masks)}
        wrap = lambda tx, total: masked_optimizer(tx, masks)  # noqa: E731
      tuned = self._finetune(model, start, cell, directory / "finetune", meta,
                             wrap_optimizer=wrap)
      report = sparsity_report(tuned["params"])
      return Compressed(model, tuned, model_config, size_bytes(tuned["params"], sparse=True),
                        {"sparsity": report["total"]["sparsity"], "per_layer": report})
    if method == "distillation":
      student_config = {**model_config, "width": model_config.get("width", 1.0) * rate}
      student = self._build(student_config)
      init = student.init(jax.random.key(cell.seed), self.dataset.train.images[:1])
      train = self.dataset.train
      steps_per_epoch = batches.steps_per_epoch(len(train), self.distill.batch_size)
      distiller = Distiller(model, variables, student, self.distill,
                            total_steps=self.distill.epochs * steps_per_epoch,
                            steps_per_epoch=steps_per_epoch,
                            num_classes=self.dataset.num_classes)
      result = distiller.run(
          init, (train.images, train.labels), seed=cell.seed, directory=directory / "distill",
          meta={**meta, "model": student_config},
          description=f"{cell.network.label} {cell.name} seed {cell.seed}")
      return Compressed(student, result.variables, student_config,
                        size_bytes(result.variables["params"]),
                        {"student_width": student_config["width"]})
    raise ValueError(f"unknown compression method {method!r}")

"""`distillation` (Hinton et al. 2015): a student of `rate` x the teacher's width, from scratch.

The student learns the teacher's soft targets with the `distill` recipe, checkpointing into the
cell's `distill/` folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import jax
import ml_collections

from adcorda_jax.compression import size_bytes
from adcorda_jax.compression.distillation import DistillSettings, Distiller, read_distill_settings
from adcorda_jax.study.methods.base import (Compressed, CompressionMethod, Original,
                                            check_fraction, register_method)
from adcorda_jax.training import batches

if TYPE_CHECKING:
  from adcorda_jax.study.compress import Compressor
  from adcorda_jax.study.grid import Cell


class Distillation(CompressionMethod):
  """Trains a narrower student; `rate` is its width relative to the teacher's."""
  name = "distillation"
  family = "distillation"
  config_sections = CompressionMethod.config_sections + ("distill",)

  def check_rate(self, rate: float, key: str) -> None:
    check_fraction(rate, key, "student widths relative to the teacher")

  def read_settings(self, config: ml_collections.ConfigDict) -> DistillSettings:
    return read_distill_settings(config)

  def compress(self, compressor: Compressor, cell: Cell, original: Original,
               settings: DistillSettings, directory: Path) -> Compressed:
    model_config = original.model_config
    student_config = {**model_config, "width": model_config.get("width", 1.0) * cell.rate}
    student = compressor.build(student_config)
    train = compressor.dataset.train
    init = student.init(jax.random.key(cell.seed), train.images[:1])
    steps_per_epoch = batches.steps_per_epoch(len(train), settings.batch_size)
    distiller = Distiller(original.model, original.variables, student, settings,
                          total_steps=settings.epochs * steps_per_epoch,
                          steps_per_epoch=steps_per_epoch,
                          num_classes=compressor.dataset.num_classes,
                          input_settings=compressor.input_settings)
    result = distiller.run(
        init, (train.images, train.labels), seed=cell.seed, directory=directory / "distill",
        meta={**original.meta, "model": student_config},
        description=f"{cell.network.label} {cell.name} seed {cell.seed}")
    return Compressed(student, result.variables, student_config,
                      size_bytes(result.variables["params"]),
                      {"student_width": student_config["width"]})


register_method(Distillation())

"""`magnitude_pruning`: the smallest-magnitude `rate` of kernel weights are zeroed.

Zeroed over all layers at once (`study.magnitude_scope = "global"`) or per layer (`"layer"`),
in one shot (`study.magnitude_schedule = "one_shot"`) or on Zhu & Gupta's polynomial schedule over
the first 75% of fine-tuning (`"gradual"`); masks in the optimizer keep them zero.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_collections

from adcorda_jax import config_checks
from adcorda_jax.compression import (apply_masks, magnitude_masks, masked_optimizer,
                                     pruning_optimizer, size_bytes, sparsity_report)
from adcorda_jax.study.methods.base import (Compressed, CompressionMethod, Original,
                                            check_fraction, register_method)

if TYPE_CHECKING:
  from adcorda_jax.study.compress import Compressor
  from adcorda_jax.study.grid import Cell

SCOPES = ("global", "layer")
SCHEDULES = ("one_shot", "gradual")


@dataclasses.dataclass(frozen=True)
class MagnitudeSettings:
  """`study.magnitude_scope` and `study.magnitude_schedule`, validated."""
  scope: str = "global"
  schedule: str = "one_shot"


class MagnitudePruning(CompressionMethod):
  """Zeroes single weights; `rate` is the fraction of kernel weights set to zero."""
  name = "magnitude_pruning"
  family = "pruning"

  def check_rate(self, rate: float, key: str) -> None:
    check_fraction(rate, key, "fractions removed")

  def read_settings(self, config: ml_collections.ConfigDict) -> MagnitudeSettings:
    section = config.get("study")
    return MagnitudeSettings(
        scope=config_checks.one_of(section, "magnitude_scope", "study", SCOPES,
                                   default="global"),
        schedule=config_checks.one_of(section, "magnitude_schedule", "study", SCHEDULES,
                                      default="one_shot"))

  def fingerprint_keys(self, settings: MagnitudeSettings) -> dict[str, Any]:
    # The default schedule is left out: cells made before schedules existed keep their record.
    return {"study.magnitude_scope": settings.scope,
            **({"study.magnitude_schedule": settings.schedule}
               if settings.schedule != "one_shot" else {})}

  def compress(self, compressor: Compressor, cell: Cell, original: Original,
               settings: MagnitudeSettings, directory: Path) -> Compressed:
    variables, rate = original.variables, cell.rate
    if settings.schedule == "gradual":
      start = variables
      wrap = lambda tx, total: pruning_optimizer(  # noqa: E731
          tx, final_sparsity=rate, end_step=max(1, int(0.75 * total)),
          update_every=max(1, total // 20), scope=settings.scope)
    else:
      masks = magnitude_masks(variables["params"], rate, settings.scope)
      start = {**variables, "params": apply_masks(variables["params"], masks)}
      wrap = lambda tx, total: masked_optimizer(tx, masks)  # noqa: E731
    tuned = compressor.finetune(original.model, start, cell, directory / "finetune",
                                original.meta, wrap_optimizer=wrap)
    report = sparsity_report(tuned["params"])
    return Compressed(original.model, tuned, original.model_config,
                      size_bytes(tuned["params"], sparse=True),
                      {"sparsity": report["total"]["sparsity"], "per_layer": report})


register_method(MagnitudePruning())

"""`filter_pruning` (Li et al. 2017): the lowest-L1 `rate` of each prunable layer's filters go.

The result is a physically smaller model, fine-tuned with the `adapt` recipe.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adcorda_jax.compression import l1_filter_prune, size_bytes
from adcorda_jax.study.methods.base import (Compressed, CompressionMethod, Original,
                                            check_fraction, register_method)

if TYPE_CHECKING:
  from adcorda_jax.study.compress import Compressor
  from adcorda_jax.study.grid import Cell


class FilterPruning(CompressionMethod):
  """Removes whole filters; `rate` is the fraction of each layer's filters removed."""
  name = "filter_pruning"
  family = "pruning"

  def check_rate(self, rate: float, key: str) -> None:
    check_fraction(rate, key, "fractions removed")

  def compress(self, compressor: Compressor, cell: Cell, original: Original, settings: Any,
               directory: Path) -> Compressed:
    pruned_config, pruned = l1_filter_prune(original.model_config, original.variables, cell.rate)
    pruned_model = compressor.build(pruned_config)
    tuned = compressor.finetune(pruned_model, pruned, cell, directory / "finetune",
                                {**original.meta, "model": pruned_config})
    return Compressed(pruned_model, tuned, pruned_config, size_bytes(tuned["params"]),
                      {"channels": list(pruned_config["channels"])})


register_method(FilterPruning())

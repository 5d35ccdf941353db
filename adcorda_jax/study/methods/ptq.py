"""`ptq`: post-training weight quantization at `rate` bits, per channel on the `model.quant` grid.

Nothing is trained, so a PTQ cell runs once (first seed) instead of once per seed.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import ml_collections

from adcorda_jax.errors import ConfigError
from adcorda_jax.quant.deploy import Quantization, quantization_from_config
from adcorda_jax.quant.fake_quant import WEIGHT_BITS, QuantSpec
from adcorda_jax.study.methods.base import (Compressed, CompressionMethod, Original,
                                            register_method)

if TYPE_CHECKING:
  from adcorda_jax.study.compress import Compressor
  from adcorda_jax.study.grid import Cell


class PostTrainingQuantization(CompressionMethod):
  """Quantizes the weights; `rate` is the weight bit width."""
  name = "ptq"
  family = "quantization"
  trains = False

  def check_rate(self, rate: float, key: str) -> None:
    if rate != int(rate) or not WEIGHT_BITS[0] <= rate <= WEIGHT_BITS[1]:
      raise ConfigError(f"{key} entries are weight bits, integers in {WEIGHT_BITS[0]}.."
                        f"{WEIGHT_BITS[1]}; got {rate!r}")

  def rate_label(self, rate: float) -> str:
    return f"w{int(rate)}"

  def read_settings(self, config: ml_collections.ConfigDict) -> Quantization:
    """`model.quant` with a placeholder bit width: the grid kind and calibration cells use."""
    quant = config.model.to_dict().get("quant") or {}
    return quantization_from_config(ml_collections.ConfigDict(
        {"quant": {**quant, "weight_bits": 8, "activation_bits": 0, "fold_batch_norm": False}}))

  def compress(self, compressor: Compressor, cell: Cell, original: Original,
               settings: Quantization, directory: Path) -> Compressed:
    bits = int(cell.rate)
    quant = settings.with_spec(QuantSpec(bits, True, settings.spec.symmetric))
    deployed = quant.ptq_variables(original.variables)
    return Compressed(original.model, deployed, original.model_config,
                      quant.size_bytes(original.variables["params"]),
                      {"bits": bits, "calibration": quant.calibration})


register_method(PostTrainingQuantization())

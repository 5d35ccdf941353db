"""Quantize the digits small CNN: float vs PTQ at 8/4/2 bits (per tensor, per channel) vs QAT.

    python main.py --config configs/quantize_digits.py --workdir runs/quantize_digits

Trains the float baseline in <workdir>/baseline (or loads `quantize.checkpoint`), then evaluates
every variant clean and under PGD, exports the PTQ weights as real integers (`exported/*.npz`)
and checks the exported model's accuracy equals the fake-quantized one's. Seconds on a CPU.
"""
import ml_collections

from configs import adcorda_digits


def get_config() -> ml_collections.ConfigDict:
  config = adcorda_digits.get_config()   # Its baseline, `adapt` (QAT optimizer) and `evaluate`.
  config.task = "quantize"
  del config.adcorda, config.correct
  config.model.quant.calibration = "mse"

  quantize = config.quantize = ml_collections.ConfigDict()
  quantize.checkpoint = ""               # A trained run's workdir/checkpoint; "" = train one.
  quantize.bits = (8, 4, 2)              # PTQ weight bit widths.
  quantize.granularities = ("per_tensor", "per_channel")
  quantize.qat_bits = (4, 2)             # QAT fine-tuning at these widths (() = none).
  quantize.seeds = (0, 1, 2)             # One QAT run per seed.
  quantize.calibration_examples = 1024   # Training images for activation ranges.

  config.adapt.epochs = 3                # QAT budget: like AdCorDA's fine-tuning.
  config.evaluate.attacks = "pgd"
  return config

"""Quantize the Fashion-MNIST small CNN: float vs PTQ w8/w4/w2 (per tensor, per channel) vs QAT.

    sudo apt-get install dataset-fashion-mnist
    python main.py --config configs/adcorda_fashion_mnist.py --workdir runs/adcorda_fm  # baseline
    python main.py --config configs/quantize_fashion_mnist.py --workdir runs/quantize_fm \
      --config.quantize.checkpoint=runs/adcorda_fm/baseline

With `quantize.checkpoint` empty it trains the same 2-epoch baseline itself. QAT runs one epoch
per seed with the AdCorDA fine-tuning optimizer, so `qat_w4` here is the same recipe as the
`same_budget_finetune` control of `configs/adcorda_fashion_mnist_quant.py`.

Measured on 2 shared CPU cores (9.2 min, on the 91.47% baseline): PTQ per tensor / per channel
91.44 / 91.49% at 8 bits, 91.04 / 91.10% at 4, 69.99 / 70.77% at 2; QAT (3 seeds) 91.52 ± 0.06%
at 4 bits, 89.11 ± 0.39% at 2; 1,872,040 bytes in float32, 470,896 / 237,152 / 120,280 bytes
per-channel at 8 / 4 / 2 bits. Every exported integer model matched its fake-quantized accuracy.
"""
import ml_collections

from configs import adcorda_fashion_mnist, quantize_digits


def get_config() -> ml_collections.ConfigDict:
  config = adcorda_fashion_mnist.get_config()
  config.task = "quantize"
  del config.adcorda, config.correct
  config.quantize = quantize_digits.get_config().quantize
  config.evaluate.attacks = "pgd"
  return config

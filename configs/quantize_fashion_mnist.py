"""Quantize the Fashion-MNIST small CNN: float vs PTQ w8/w4/w2 (per tensor, per channel) vs QAT.

    sudo apt-get install dataset-fashion-mnist
    python main.py --config configs/adcorda_fashion_mnist.py --workdir runs/adcorda_fm  # baseline
    python main.py --config configs/quantize_fashion_mnist.py --workdir runs/quantize_fm \
      --config.quantize.checkpoint=runs/adcorda_fm/baseline

With `quantize.checkpoint` empty it trains the same 2-epoch baseline itself. QAT runs one epoch
per seed with the AdCorDA fine-tuning optimizer, so `qat_w4` here is the same recipe as the
`same_budget_finetune` control of `configs/adcorda_fashion_mnist_quant.py`.
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

"""AdCorDA on a weight-quantized Fashion-MNIST network, at 8, 4 or 2 bits (config argument).

    python main.py --config configs/adcorda_fashion_mnist_quant.py:4 --workdir runs/adcorda_fm_w4
    python main.py --config configs/adcorda_fashion_mnist_quant.py:2 --workdir runs/adcorda_fm_w2 \
      --config.adcorda.baseline_checkpoint=runs/adcorda_fm/baseline   # reuse a float baseline

The float baseline is configs/adcorda_fashion_mnist.py's. Its post-training quantization
(per-channel symmetric kernels, MSE calibration) is the `baseline` variant and what stage 1
corrects; all fine-tuning runs with fake-quantized kernels (straight-through gradients), so
`same_budget_finetune` is the QAT control. results.json lists them as `ptq_w4_per_channel`,
`qat_w4`, `corrected_ce_w4` and `adcorda_w4` under `quantization.variants`, with sizes in bytes.

Measured (3 seeds, 2 shared CPU cores, ~17 min each with the float baseline reused): at 4 bits
PTQ 91.10%, QAT 91.52 ± 0.06%, AdCorDA 91.35 ± 0.01%; at 2 bits PTQ 70.77%, QAT 89.11 ± 0.39%,
AdCorDA 88.24 ± 0.48%.
"""
import ml_collections

from configs import adcorda_fashion_mnist


def get_config(bits: str = "4") -> ml_collections.ConfigDict:
  config = adcorda_fashion_mnist.get_config()
  config.model.quant.weight_bits = int(bits)
  return config

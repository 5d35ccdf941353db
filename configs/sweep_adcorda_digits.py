"""The AdCorDA map on digits, small enough for a laptop CPU in minutes (the same axes as
configs/sweep_adcorda_fashion_mnist.py, around configs/adcorda_digits.py).

    python main.py --config configs/sweep_adcorda_digits.py --workdir runs/map_digits

Base cell: half-width small_cnn trained 1 epoch (weak on purpose), correction eps 0.1, lambda 1,
3 fine-tuning epochs. Axes one at a time: baseline epochs 1, 3, 10; width 0.5, 1; weight bits
float, 4, 3, 2; eps 0.05, 0.1, 0.2; lambda 0.3, 1, 3; and the three readings of the method. Each
cell at 3 seeds, robust accuracy under PGD-10 at eps 0.05 on the whole test split.
"""
import ml_collections

from configs import adcorda_digits
from configs.sweep_adcorda_fashion_mnist import adcorda_map, sweep_section


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "sweep"
  base = config.base = adcorda_digits.get_config()
  base.adcorda.seeds = (0,)
  base.adcorda.plot_examples = 0
  base.evaluate.attacks = "pgd"
  base.train.log_every_steps = 50
  config.sweep = sweep_section(adcorda_map(
      epochs=(1, 3, 10), widths=(0.5, 1.0), bits=(0, 4, 3, 2), eps=(0.05, 0.1, 0.2),
      lambdas=(0.3, 1.0, 3.0)))
  return config

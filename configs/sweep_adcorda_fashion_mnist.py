"""The AdCorDA map on Fashion-MNIST: where does correction + CORAL beat more training?

    python main.py --config configs/sweep_adcorda_fashion_mnist.py --workdir runs/map_fashion
    python main.py --config configs/sweep_adcorda_fashion_mnist.py --workdir runs/map_fashion \
        --config.sweep.mode=commands       # one command per cell + SLURM array scripts

A one-at-a-time map around configs/adcorda_fashion_mnist.py (2 baseline epochs, width 1, float
weights, correction eps 0.05, lambda 1): each axis varies alone, every cell is run at 3 seeds
(the `seed` of the baseline, its correction and fine-tuning), and each cell's AdCorDA run is
compared, paired by seed, with the same-budget fine-tune and with the baseline. Axes:

* baseline training length `train.epochs` 1, 2, 6 (under-trained to the full recipe);
* network width `model.width` 0.5, 1, 2;
* weight bits `model.quant.weight_bits` float (0), 4, 3, 2 (same_budget_finetune is then QAT);
* correction budget `correct.eps` 0.02, 0.05, 0.1, and alignment weight `adapt.lambda_` 0.3, 1, 3;
* readings of the method: `adapt.direction=reverse` (corrected set as target),
  `adapt.source=corrected_subset` (only the corrected images as source), `adapt.start=corrected_ce`
  (adaptation from the model fine-tuned on the corrected set; the control then trains 2x too).

Cells that train the same baseline share it (`baselines/`). Robust accuracy: PGD-10 at 4/255 on
the first 1,000 test images. See docs/results/adcorda_map/ for the measured map.
"""
import ml_collections

from adcorda_jax.sweep import axes
from configs import adcorda_fashion_mnist

COMPARE = ("adcorda - same_budget_finetune", "adcorda - baseline",
           "corrected_ce - same_budget_finetune")
METRICS = ("test_accuracy", "robust")


def adcorda_map(*, epochs, widths, bits, eps, lambdas) -> axes.Cells:
  """The one-at-a-time AdCorDA map: the base cell, each axis alone, each reading of the method."""
  return axes.chain(
      axes.center(),
      axes.sweep("train.epochs", epochs),
      axes.sweep("model.width", widths),
      axes.sweep("model.quant.weight_bits", bits),
      axes.sweep("correct.eps", eps),
      axes.sweep("adapt.lambda_", lambdas),
      axes.sweep("adapt.direction", ("reverse",)),
      axes.sweep("adapt.source", ("corrected_subset",)),
      axes.sweep("adapt.start", ("corrected_ce",)),
  )


def sweep_section(cells: axes.Cells, seeds=(0, 1, 2)) -> ml_collections.ConfigDict:
  sweep = ml_collections.ConfigDict()
  sweep.mode = "run"                 # run | commands (commands.txt, SLURM) | collect
  sweep.cells = cells                # Overrides per cell (adcorda_jax.sweep.axes)...
  sweep.seeds = seeds                # ...times these values of `sweep.seed_key`.
  sweep.seed_key = "seed"
  sweep.compare = COMPARE            # Paired by seed, 95% intervals.
  sweep.metrics = METRICS            # "robust" = every robust.<attack>@<eps>.
  sweep.share_baseline = True        # Cells with the same data/model/train/seed share one.
  sweep.only = ""                    # Regex over cell names: run or collect a subset.
  sweep.on_error = "stop"            # stop, or continue with the other cells.
  sweep.command = "{python} {main} --config {config} --workdir {workdir}"  # commands mode.
  return sweep


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "sweep"
  base = config.base = adcorda_fashion_mnist.get_config()
  base.adcorda.seeds = (0,)          # One fine-tuning per cell seed: `seed` is the sweep's axis.
  base.adcorda.plot_examples = 0
  base.evaluate.attacks = "pgd"
  base.evaluate.eps = (4 / 255,)
  config.sweep = sweep_section(adcorda_map(
      epochs=(1, 2, 6), widths=(0.5, 1.0, 2.0), bits=(0, 4, 3, 2), eps=(0.02, 0.05, 0.1),
      lambdas=(0.3, 1.0, 3.0)))
  return config

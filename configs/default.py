"""Default: the whole AdCorDA pipeline on scikit-learn's bundled digits (offline, on a CPU).

    python main.py --config configs/default.py --workdir runs/default

Trains a deliberately weak baseline, corrects its misclassified training digits with targeted PGD,
fine-tunes the three variants (corrected_ce, same_budget_finetune, adcorda) over three seeds and
evaluates them clean and under attack. This is configs/adcorda_digits.py; see it for every field.
To only train a classifier, use configs/train_digits.py.
"""
import ml_collections

from configs import adcorda_digits


def get_config() -> ml_collections.ConfigDict:
  return adcorda_digits.get_config()

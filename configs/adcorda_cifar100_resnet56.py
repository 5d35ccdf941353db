"""AdCorDA on CIFAR-100 with ResNet-56 (for a GPU/TPU).

    python main.py --config configs/adcorda_cifar100_resnet56.py --workdir runs/adcorda_cifar100
    # Or refine an already trained baseline:
    #   --config.adcorda.baseline_checkpoint=runs/cifar100_resnet56

The baseline recipe is configs/cifar100_resnet56.py (200 epochs, augmentation). Not run here: no
run time or accuracy has been measured for this config; the correction eps, lambda, epochs and
learning rate are guesses (not given in the paper) to be tuned on the validation split.
"""
import ml_collections

from configs import adcorda_cifar10_resnet20, cifar100_resnet56


def get_config() -> ml_collections.ConfigDict:
  config = adcorda_cifar10_resnet20.get_config()
  baseline = cifar100_resnet56.get_config()
  config.data = baseline.data
  config.model = baseline.model
  config.train = baseline.train
  config.adapt.weight_decay = 5e-4    # As the baseline.
  return config

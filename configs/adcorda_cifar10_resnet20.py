"""AdCorDA on CIFAR-10 with ResNet-20 (for a GPU/TPU): the paper's kind of setting.

    python main.py --config configs/adcorda_cifar10_resnet20.py --workdir runs/adcorda_cifar10
    # Or refine an already trained baseline instead of training one in <workdir>/baseline:
    python main.py --config configs/adcorda_cifar10_resnet20.py --workdir runs/adcorda_cifar10 \\
        --config.adcorda.baseline_checkpoint=runs/cifar10_resnet20

The baseline recipe is configs/cifar10_resnet20.py (182 epochs, augmentation). Fine-tuning runs
on the un-augmented corrected set. Not run here: no run time or accuracy has been measured for
this config; the correction eps, lambda, epochs and learning rate are guesses (the paper, arXiv
2401.13212, does not give them) to be tuned on the validation split.
"""
import ml_collections

from configs import adcorda_digits, cifar10_resnet20


def get_config() -> ml_collections.ConfigDict:
  config = adcorda_digits.get_config()
  baseline = cifar10_resnet20.get_config()
  config.data = baseline.data
  config.model = baseline.model
  config.train = baseline.train

  config.correct.eps = 8 / 255
  config.correct.steps = 20
  config.correct.batch_size = 512

  config.adapt.epochs = 10
  config.adapt.batch_size = 128
  config.adapt.learning_rate = 0.01   # A tenth of the baseline's peak.
  config.adapt.weight_decay = 1e-4    # As the baseline.
  config.adapt.warmup_epochs = 0.0
  config.adapt.log_every_steps = 100

  config.evaluate.eps = (2 / 255, 8 / 255)
  config.evaluate.max_examples = 1000
  config.evaluate.batch_size = 500
  return config

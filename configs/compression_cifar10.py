"""The compression study on CIFAR-10 (GPU/TPU): ResNet-56 vs ResNet-20, CIFAR-10-C from TFDS.

    python main.py --config configs/compression_cifar10.py --workdir runs/study_cifar10

Each network trains with configs/cifar10_resnet20.py's recipe (182 epochs); pruning fine-tunes 20
epochs, distillation trains a half-width student 100 epochs. Shift: this library's corruptions on
the first 2,000 test images, plus TFDS's `cifar10_corrupted` sets as extra domains (downloaded and
prepared on first use; all 10,000 images of each are evaluated). Not run here (no accelerator).
"""
import ml_collections

from configs import cifar10_resnet20, compression_digits


def get_config() -> ml_collections.ConfigDict:
  config = compression_digits.get_config()
  base = cifar10_resnet20.get_config()
  config.data = base.data
  config.model = base.model
  config.model.quant = compression_digits.get_config().model.quant
  config.train = base.train

  config.study.networks = ("resnet56:1.0", "resnet20:1.0")
  config.study.rates.filter_pruning = (0.3, 0.5, 0.7)
  config.study.rates.magnitude_pruning = (0.5, 0.8, 0.95)
  config.study.rates.distillation = (0.5,)
  config.study.seeds = (0, 1, 2)

  config.adapt.epochs = 20
  config.adapt.batch_size = 128
  config.adapt.learning_rate = 0.01
  config.distill.epochs = 100
  config.distill.batch_size = 128
  config.distill.learning_rate = 0.1

  config.shift.max_examples = 2000
  for corruption in ("fog", "frost", "snow", "motion_blur"):
    domain = ml_collections.ConfigDict(base.data.to_dict())  # Same TFDS settings.
    domain.name = f"cifar10_corrupted/{corruption}_3"
    domain.augment = False
    config.shift.domains[corruption] = domain
  config.evaluate.attacks = "pgd,apgd_ce"
  config.evaluate.eps = (1 / 255, 2 / 255, 4 / 255)
  config.evaluate.max_examples = 2000
  config.evaluate.batch_size = 500
  return config

"""ResNet-56 on CIFAR-100 via TFDS (for a GPU/TPU).

    python main.py --config configs/cifar100_resnet56.py --workdir runs/cifar100_resnet56

TFDS downloads and prepares `cifar100` on first use. Not yet run to completion here; published
ResNet-56 results on CIFAR-100 with this kind of recipe are around 70-72% test accuracy.
"""
import ml_collections

from configs import train_digits as base_lib


def get_config() -> ml_collections.ConfigDict:
  config = base_lib.get_config()
  config.data.name = "cifar100"
  config.data.val_fraction = 0.1
  config.data.augment = True
  config.model.name = "resnet56"
  config.model.dropout = 0.0
  config.train.epochs = 200
  config.train.batch_size = 128
  config.train.eval_batch_size = 1000
  config.train.learning_rate = 0.1
  config.train.weight_decay = 5e-4
  config.train.schedule = "cosine"
  config.train.warmup_epochs = 1.0
  config.train.log_every_steps = 100
  return config

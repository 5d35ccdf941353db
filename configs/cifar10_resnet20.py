"""ResNet-20 on CIFAR-10 via TFDS, the standard recipe of He et al. 2016 (for a GPU/TPU).

    python main.py --config configs/cifar10_resnet20.py --workdir runs/cifar10_resnet20

TFDS downloads and prepares `cifar10` on first use (internet needed once; set
`--config.data.tfds_data_dir` to reuse a prepared copy). 182 epochs are meant for an accelerator;
on a 2-core CPU they take many hours. He et al. report 91.25% test accuracy for this recipe; this
config has not yet been run to completion here.
"""
import ml_collections

from configs import train_digits as base_lib


def get_config() -> ml_collections.ConfigDict:
  config = base_lib.get_config()
  config.data.name = "cifar10"
  config.data.val_fraction = 0.1
  config.data.augment = True          # Pad-4 random crop + horizontal flip.
  config.model.name = "resnet20"
  config.model.dropout = 0.0
  config.train.epochs = 182
  config.train.batch_size = 128
  config.train.eval_batch_size = 1000
  config.train.learning_rate = 0.1
  config.train.weight_decay = 1e-4
  config.train.schedule = "step"
  config.train.step_boundaries = (0.5, 0.75)
  config.train.warmup_epochs = 1.0
  config.train.log_every_steps = 100
  return config

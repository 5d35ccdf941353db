"""Tiny run for tests and smoke checks: a narrow CNN on 300 digits for 2 epochs (seconds).

    python main.py --config configs/tiny.py --workdir /tmp/tiny
"""
import ml_collections

from configs import train_digits as base_lib


def get_config() -> ml_collections.ConfigDict:
  config = base_lib.get_config()
  config.data.max_train_examples = 256
  config.model.width = 0.5
  config.train.epochs = 2
  config.train.batch_size = 32
  config.train.eval_batch_size = 64
  config.train.log_every_steps = 4
  config.train.checkpoint_every_steps = 4
  return config

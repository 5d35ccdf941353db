"""The compression study (arXiv 2401.12014) on Fashion-MNIST (real 28x28 images, offline), CPU.

    sudo apt-get install dataset-fashion-mnist
    python main.py --config configs/compression_fashion_mnist.py --workdir runs/study_fm

Small CNN at width 1 (468k params) and 0.5 (~120k), each trained 2 epochs, compressed by L1
filter pruning (50%, 75% of filters), magnitude pruning (50%, 90% of weights), distillation into a
half-width student and 8/4-bit PTQ; fine-tuning one epoch; seeds 0-2 (34 cells). Shift: 12
corruptions x 5 severities on 1,000 test images; PGD and APGD-CE on 500. The whole grid took
25 min in one call on this project's 2-core CPU (README has the results).
"""
import ml_collections

from configs import compression_digits, fashion_mnist


def get_config() -> ml_collections.ConfigDict:
  config = compression_digits.get_config()
  base = fashion_mnist.get_config()
  config.data = base.data
  config.model.dropout = base.model.dropout
  config.train = base.train
  config.train.epochs = 2
  # One CPU device: with cpu_devices=2 a run of this grid once hung in XLA:CPU's in-process
  # all-reduce (rendezvous timeout) on these 2 shared cores.
  config.cpu_devices = 0

  config.adapt.epochs = 1
  config.adapt.batch_size = 128
  config.adapt.learning_rate = 0.005
  config.adapt.log_every_steps = 100
  config.distill.epochs = 2
  config.distill.batch_size = 128
  config.distill.log_every_steps = 100

  config.shift.max_examples = 1000
  config.evaluate.attacks = "pgd,apgd_ce"
  config.evaluate.eps = (1 / 255, 4 / 255)
  config.evaluate.max_examples = 500
  config.evaluate.batch_size = 500
  config.study.seeds = (0, 1, 2)  # Fine-tuning / distillation seeds; PTQ is deterministic.
  return config

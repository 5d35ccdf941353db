"""AdCorDA on Fashion-MNIST (real 28x28 images, read offline from local IDX files), small CNN.

    sudo apt-get install dataset-fashion-mnist   # IDX files in /usr/share/datasets/fashion-mnist
    python main.py --config configs/adcorda_fashion_mnist.py --workdir runs/adcorda_fashion_mnist

The baseline is configs/fashion_mnist.py cut to 2 epochs (it leaves a few % of the 55,000
training images misclassified: those are what stage 1 corrects). Each fine-tuned variant runs one
epoch per seed (430 steps).

Measured on 2 shared CPU cores: 17 min wall (baseline 2 min, correction 25 s, nine fine-tuning
runs 10 min, evaluation 5 min). 3,833 of 55,000 training images misclassified, 3,812 corrected
(mean linf norm 0.014). Test accuracy over 3 seeds: baseline 91.47%, corrected_ce 91.53 ± 0.10,
same_budget_finetune 91.63 ± 0.07, adcorda 91.50 ± 0.06; PGD robust accuracy at 4/255 on 1,000
test images: 72.3 / 66.6 / 71.6 / 66.0%. adapt.batch_norm=frozen gave the same validation
accuracy (seed 0, within 1 image of 5,000).
"""
import ml_collections

from configs import adcorda_digits, fashion_mnist


def get_config() -> ml_collections.ConfigDict:
  config = adcorda_digits.get_config()
  baseline = fashion_mnist.get_config()
  config.data = baseline.data
  config.model = baseline.model       # small_cnn, width 1, dropout 0.25.
  config.train = baseline.train
  config.train.epochs = 2             # The full recipe trains 6.

  config.correct.eps = 0.05           # ~13/255; not given in the paper.
  config.correct.steps = 20
  config.correct.batch_size = 256

  config.adapt.epochs = 1
  config.adapt.batch_size = 128
  config.adapt.learning_rate = 0.005  # A tenth of the baseline's peak.
  config.adapt.log_every_steps = 100

  config.evaluate.eps = (1 / 255, 4 / 255)
  config.evaluate.max_examples = 1000  # Robust accuracy on the first 1,000 test images.
  config.evaluate.batch_size = 500
  return config

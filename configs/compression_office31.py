"""The compression study across Office-31 domains (the paper's setting): train on one domain
(amazon), evaluate the shift to the others (webcam, dslr). GPU/TPU.

Office-31 is not downloadable from a registry: get it from its authors (Saenko et al. 2010; e.g.
the `office31` archives mirrored by domain-adaptation toolkits), unpack to
`<root>/{amazon,webcam,dslr}/images/<class>/*.jpg`, then

    python main.py --config configs/compression_office31.py --workdir runs/study_office31 \
      --config.data.data_dir=<root>/amazon/images \
      --config.shift.domains.webcam.data_dir=<root>/webcam/images \
      --config.shift.domains.dslr.data_dir=<root>/dslr/images

Images are resized to 64x64 (ResNet-18 vs ResNet-34, ImageNet-style stems); 20% of the source
domain is held out as its test split. Not run here.
"""
import ml_collections

from configs import compression_digits


def _folder(data_dir: str = "") -> ml_collections.ConfigDict:
  data = compression_digits.get_config().data
  data.name = "image_folder"
  data.data_dir = data_dir
  data.image_size = 64
  data.val_fraction = 0.1
  data.test_fraction = 0.2
  return data


def get_config() -> ml_collections.ConfigDict:
  config = compression_digits.get_config()
  config.data = _folder()
  config.data.augment = True
  config.model.name = "resnet34"
  config.train.epochs = 60
  config.train.batch_size = 64
  config.train.learning_rate = 0.05

  config.study.networks = ("resnet34:1.0", "resnet18:1.0")
  config.study.rates.filter_pruning = (0.3, 0.5)
  config.study.rates.magnitude_pruning = (0.5, 0.9)
  config.study.rates.distillation = (0.5,)
  config.adapt.epochs = 10
  config.distill.epochs = 60

  config.shift.max_examples = 0
  config.shift.domains.webcam = _folder()   # Every image of a domain is evaluated.
  config.shift.domains.dslr = _folder()
  config.evaluate.eps = (1 / 255, 2 / 255)
  config.evaluate.max_examples = 1000
  return config

"""scikit-learn's bundled 8x8 handwritten digits: a tiny offline dataset for smoke runs."""
from __future__ import annotations

import ml_collections
import numpy as np
from sklearn import datasets as sklearn_datasets

from adcorda_jax.data.dataset import DATASETS, RawSplits, Split

# Pixel values in load_digits are counts of set pixels in 4x4 blocks: integers 0..16.
_MAX_PIXEL = 16.0


@DATASETS.register("digits")
def load_digits(data_config: ml_collections.ConfigDict) -> RawSplits:
  """1,797 grayscale 8x8 digits in [0, 1]; no test split (it is carved from train)."""
  del data_config  # Nothing to configure: the data ships with scikit-learn.
  bunch = sklearn_datasets.load_digits()
  images = (np.asarray(bunch.images, np.float32) / _MAX_PIXEL)[..., np.newaxis]
  labels = np.asarray(bunch.target, np.int32)
  return Split(images, labels), None, tuple(str(digit) for digit in range(10))

"""Deterministic batching: a shuffled training stream addressable by step, padded eval batches.

Training batch `step` is a pure function of (seed, step): the stream is the concatenation of one
seeded permutation per epoch, cut into fixed-size batches. A resumed run therefore sees exactly the
batches an uninterrupted run would, with no iterator state in the checkpoint, and every batch has
the same shape (one compile). Evaluation pads the last batch and returns a mask, so no test example
is dropped from accuracy and nothing recompiles.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of the examples in training batch `step` (may straddle two epochs)."""
  start = step * batch_size
  stop = start + batch_size
  first_epoch, last_epoch = start // num_examples, (stop - 1) // num_examples
  stream = np.concatenate([
      epoch_permutation(num_examples, seed, epoch)
      for epoch in range(first_epoch, last_epoch + 1)
  ])
  offset = start - first_epoch * num_examples
  return stream[offset:offset + batch_size]


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return -(-num_examples // batch_size)


def padded_batches(images: np.ndarray, labels: np.ndarray,
                   batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size batches over a split; the last one is zero-padded and masked out."""
  for start in range(0, len(labels), batch_size):
    chunk_images = images[start:start + batch_size]
    chunk_labels = labels[start:start + batch_size]
    valid = len(chunk_labels)
    pad = batch_size - valid
    mask = np.ones(batch_size, np.float32)
    if pad:
      chunk_images = np.concatenate(
          [chunk_images, np.zeros((pad,) + chunk_images.shape[1:], chunk_images.dtype)])
      chunk_labels = np.concatenate([chunk_labels, np.zeros(pad, chunk_labels.dtype)])
      mask[valid:] = 0.0
    yield {"image": chunk_images, "label": chunk_labels, "mask": mask}

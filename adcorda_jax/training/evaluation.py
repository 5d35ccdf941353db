"""Accuracy and loss of a model over a whole split, in padded, sharded, fixed-size batches."""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from adcorda_jax import distributed
from adcorda_jax.training import batches, sharding


def to_host(value: jax.Array) -> np.ndarray:
  """Fetches a (possibly multi-host) array as numpy: the whole array on every process.

  A replicated array is read from this process's copy; one sharded over processes (a batch's
  predictions) is all-gathered, so every process must call this for the same arrays.
  """
  return distributed.gather_to_host(value)


def evaluate_split(eval_fn: Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]],
                   variables: Any, images: np.ndarray, labels: np.ndarray, batch_size: int,
                   mesh: Mesh) -> dict[str, float] | None:
  """Returns {'accuracy', 'loss', 'count'} over every example of the split (None if empty).

  `eval_fn(variables, batch)` must return masked sums `correct`, `loss_sum` and `count`; the last
  batch is padded so every example counts once and nothing recompiles.
  """
  if len(labels) == 0:
    return None
  totals = None
  for batch in batches.padded_batches(images, labels, batch_size):
    sums = eval_fn(variables, sharding.put_batch(batch, mesh))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = {k: float(to_host(v)) for k, v in totals.items()}
  return {
      "accuracy": totals["correct"] / totals["count"],
      "loss": totals["loss_sum"] / totals["count"],
      "count": int(totals["count"]),
  }

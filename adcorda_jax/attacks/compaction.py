"""Evaluating the model on the still-active examples only, inside a compiled attack loop.

An attack's `while_loop` runs until its last example is done, but with early stopping most
examples finish long before (APGD and Square break most points in a fraction of their budget),
and a masked full batch keeps paying for them. `on_active` moves the active examples to the front
(a stable argsort), evaluates `fn` on the smallest of a few static bucket sizes that holds them
(`lax.switch`, one compiled branch per size: the batch, 1/2, 1/4 and 1/8 of it), and scatters the
results back. Rows outside the evaluated bucket come back as zeros: callers must ignore the
outputs of inactive examples, as a masked loop already does. Each example's result is computed
from its own row only, so it equals the full-batch evaluation.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

BUCKET_HALVINGS = 3   # Buckets N, N/2, N/4, N/8.


def bucket_sizes(batch: int) -> tuple[int, ...]:
  """The static evaluation sizes for a batch of `batch`, largest first."""
  return tuple(sorted({max(1, math.ceil(batch / 2 ** k)) for k in range(BUCKET_HALVINGS + 1)},
                      reverse=True))


def on_active(fn: Callable[[Any], Any], active: jax.Array, inputs: Any) -> Any:
  """`fn(inputs)` for the rows where `active` [N] is True; zeros elsewhere may be returned.

  `inputs` and `fn`'s outputs are pytrees of [N, ...] (resp. [B, ...]) arrays; `fn` must treat
  rows independently (an eval-mode model does).
  """
  batch = active.shape[0]
  sizes = bucket_sizes(batch)
  if len(sizes) == 1:
    return fn(inputs)
  order = jnp.argsort(~active, stable=True)  # Active rows first, in their original order.

  def branch(size: int) -> Callable[[Any], Any]:
    def run(inputs):
      if size == batch:
        return fn(inputs)
      rows = order[:size]
      outputs = fn(jax.tree.map(lambda a: a[rows], inputs))
      return jax.tree.map(
          lambda o: jnp.zeros((batch,) + o.shape[1:], o.dtype).at[rows].set(o), outputs)
    return run

  count = jnp.sum(active.astype(jnp.int32))
  # The smallest size >= count: sizes run largest first, so count the ones that still fit.
  index = jnp.sum((jnp.asarray(sizes) >= count).astype(jnp.int32)) - 1
  return jax.lax.switch(jnp.maximum(index, 0), [branch(size) for size in sizes], inputs)

"""Size and cost of a (pruned) model: parameter counts, bytes and FLOPs per example.

FLOPs come from XLA's cost analysis of the compiled eval-mode forward pass on one example, so they
count what actually runs (a multiply-add is 2 FLOPs; normalization, BatchNorm, pooling included).
Unstructured zeros do not lower FLOPs here: dense kernels multiply them anyway.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FLOAT32_BYTES = 4


def count_parameters(params: Any) -> int:
  """Number of scalars in a pytree of arrays."""
  return sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params))


def nonzero_parameters(params: Any) -> int:
  """Number of nonzero scalars in a pytree of arrays."""
  return sum(int(np.count_nonzero(np.asarray(leaf))) for leaf in jax.tree.leaves(params))


def _flops(cost: Any) -> float:
  """The 'flops' entry of `cost_analysis()`, a dict or (older JAX) a list of dicts."""
  if isinstance(cost, (list, tuple)):
    return sum(_flops(entry) for entry in cost)
  if not cost or "flops" not in cost:
    raise RuntimeError("XLA's cost analysis reported no FLOPs on this backend")
  return float(cost["flops"])


def _eval_forward(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
  return model.apply(variables, images, train=False)


# Keyed by the module's value, so equal models (a study's seeds and cells) compile once.
_shared_eval_forward = jax.jit(_eval_forward, static_argnums=0)


def flops_per_example(model: nn.Module, variables: Any, image_shape: Sequence[int]) -> float:
  """FLOPs of one eval-mode forward pass on a single image of `image_shape` (H, W, C)."""
  images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  try:
    hash(model)
  except TypeError:  # A field that does not hash (e.g. an array): compile for this model only.
    lowered = jax.jit(functools.partial(_eval_forward, model)).lower(variables, images)
  else:
    lowered = _shared_eval_forward.lower(model, variables, images)
  return _flops(lowered.compile().cost_analysis())


def size_bytes(params: Any, sparse: bool = False) -> int:
  """float32 storage of `params`; `sparse`: nonzero values plus a 1-bit mask per weight.

  The sparse size is the honest size of an unstructured-sparse model: a bitmap says where the
  nonzeros are, so it only pays off above ~3% sparsity.
  """
  total = count_parameters(params)
  if not sparse:
    return FLOAT32_BYTES * total
  return FLOAT32_BYTES * nonzero_parameters(params) + math.ceil(total / 8)

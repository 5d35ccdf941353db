"""Geometry of the perturbation sets: ball projection, steepest ascent, random starts, norms.

Every function works per example on a batch `x` of shape [N, ...] with a per-example radius `eps`
of shape [N] (a scalar broadcasts), so one compiled attack serves any mix of budgets.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NORMS = ("linf", "l2")


def per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes per-example `values` [N] (or a scalar) to broadcast against `like` [N, ...]."""
  values = jnp.asarray(values, jnp.float32)
  values = jnp.broadcast_to(values, like.shape[:1])
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


def perturbation_norm(delta: jax.Array, norm: str) -> jax.Array:
  """The `norm` of each example's perturbation `delta` [N, ...], as float32 [N]."""
  flat = delta.reshape(delta.shape[0], -1).astype(jnp.float32)
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=1, initial=0.0)
  return jnp.sqrt(jnp.sum(flat * flat, axis=1))


def _safe_divide(delta: jax.Array, norms: jax.Array) -> jax.Array:
  """`delta / norms` per example, leaving all-zero examples at zero instead of NaN."""
  safe = jnp.where(norms > 0, norms, 1.0)
  return delta / per_example(safe, delta)


def ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  """Steepest-ascent unit direction for `norm`: sign(grad) for linf, grad/||grad||_2 for l2."""
  if norm == "linf":
    return jnp.sign(grad)
  return _safe_divide(grad, perturbation_norm(grad, "l2"))


def project(adversarial: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """Projects onto the `eps`-ball around `x`, then clips to the image range [0, 1].

  Clipping after the projection cannot leave the ball: since x is in [0, 1], clipping x + delta
  only moves each coordinate of delta towards 0, which shrinks every l_p norm.
  """
  eps = per_example(eps, x)
  if norm == "linf":
    inside = jnp.clip(adversarial, x - eps, x + eps)
  else:
    delta = adversarial - x
    norms = per_example(perturbation_norm(delta, "l2"), x)
    scale = jnp.where(norms > eps, eps / jnp.where(norms > 0, norms, 1.0), 1.0)
    inside = x + delta * scale
  return jnp.clip(inside, 0.0, 1.0)


def random_start(key: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """A point drawn uniformly from the `eps`-ball around `x`, clipped to [0, 1].

  The noise is drawn at unit radius and then scaled by each example's eps, so runs with the same
  key but different budgets start from proportional points (per-example eps == separate runs).
  """
  if norm == "linf":
    unit = jax.random.uniform(key, x.shape, jnp.float32, -1.0, 1.0)
  else:
    direction_key, radius_key = jax.random.split(key)
    gaussian = jax.random.normal(direction_key, x.shape, jnp.float32)
    direction = _safe_divide(gaussian, perturbation_norm(gaussian, "l2"))
    dims = math.prod(x.shape[1:])
    radius = jax.random.uniform(radius_key, x.shape[:1], jnp.float32) ** (1.0 / dims)
    unit = direction * per_example(radius, x)
  return project(x + unit * per_example(eps, x), x, eps, norm)

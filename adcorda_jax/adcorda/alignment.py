"""Feature-distribution alignment losses for AdCorDA's domain-adaptation stage.

Each loss maps a source batch [B, d] and a target batch [B2, d] of penultimate features to a
float32 scalar that is 0 when the two batches have the same statistics. B and B2 may differ.

Optional `source_mask` / `target_mask` ([B] / [B2], 1 = real row, 0 = padding) let padded batches
(e.g. the masked last eval batch) be used without the padding rows skewing the statistics. Training
batches are always full (see `training.batches`), so training code can leave them out.

* `coral_loss`: Deep CORAL (Sun & Saenko 2016), ||C_s - C_t||_F^2 / (4 d^2) with the unbiased
  covariance (divisor n - 1, as in the paper).
* `mmd_loss`: squared MMD with a sum of Gaussian kernels (biased V-statistic estimator).
* `"none"`: zero, for a cross-entropy-only fine-tuning baseline.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from adcorda_jax.errors import ConfigError

AlignmentLoss = Callable[..., jax.Array]
# Kernel widths as multiples of the median pairwise squared distance (see `mmd_loss`).
DEFAULT_BANDWIDTHS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _weights(features: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Row weights [n] in float32: the mask, or all ones."""
  if mask is None:
    return jnp.ones(features.shape[:1], jnp.float32)
  return jnp.asarray(mask, jnp.float32).reshape(features.shape[:1])


def covariance(features: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Unbiased feature covariance [d, d] over the (masked) rows, in float32.

  The divisor n - 1 is clamped to >= 1 so a single-row batch gives a zero matrix, not NaN.
  """
  x = jnp.asarray(features, jnp.float32)
  w = _weights(x, mask)
  n = jnp.sum(w)
  mean = jnp.sum(x * w[:, None], axis=0) / jnp.maximum(n, 1.0)
  centered = (x - mean) * w[:, None]
  return centered.T @ centered / jnp.maximum(n - 1.0, 1.0)


def coral_loss(source_features: jax.Array, target_features: jax.Array, *,
               source_mask: jax.Array | None = None,
               target_mask: jax.Array | None = None) -> jax.Array:
  """Deep CORAL: squared Frobenius distance of the two covariances, divided by 4 d^2.

  Scales as c^4 when both feature sets are scaled by c, so lambda depends on the feature scale.
  """
  d = source_features.shape[-1]
  difference = (covariance(source_features, source_mask)
                - covariance(target_features, target_mask))
  return jnp.sum(jnp.square(difference)) / (4.0 * d * d)


def _squared_distances(x: jax.Array) -> jax.Array:
  """Pairwise squared Euclidean distances [n, n] (Gram form, clipped at 0)."""
  squared_norms = jnp.sum(jnp.square(x), axis=-1)
  distances = squared_norms[:, None] + squared_norms[None, :] - 2.0 * (x @ x.T)
  return jnp.maximum(distances, 0.0)


def mmd_loss(source_features: jax.Array, target_features: jax.Array, *,
             bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS, relative: bool = True,
             source_mask: jax.Array | None = None,
             target_mask: jax.Array | None = None) -> jax.Array:
  """Squared MMD between the batches with k(x, y) = sum_b exp(-||x - y||^2 / (b * m)).

  With `relative` (default) m is the median squared distance over distinct pairs of the pooled
  (masked) rows, held constant for the gradient (stop_gradient): the median heuristic, so the
  kernels adapt to the feature scale and the widths span 16x around it. With relative=False,
  m = 1 and the `bandwidths` are absolute values of 2 sigma^2. Biased V-statistic estimator
  (diagonal terms included): mean K_ss + mean K_tt - 2 mean K_st, >= 0 up to rounding, 0 for
  identical batches, symmetric in the two batches.
  """
  if not bandwidths or any(b <= 0 for b in bandwidths):
    raise ValueError(f"bandwidths must be non-empty and > 0, got {bandwidths!r}")
  source = jnp.asarray(source_features, jnp.float32)
  target = jnp.asarray(target_features, jnp.float32)
  num_source = source.shape[0]
  pooled = jnp.concatenate([source, target])
  weights = jnp.concatenate([_weights(source, source_mask), _weights(target, target_mask)])
  distances = _squared_distances(pooled)
  if relative:
    off_diagonal = ~jnp.eye(pooled.shape[0], dtype=bool)
    valid = off_diagonal & (weights[:, None] > 0) & (weights[None, :] > 0)
    median = jnp.nanmedian(jnp.where(valid, distances, jnp.nan))
    scale = jax.lax.stop_gradient(jnp.where(jnp.isfinite(median) & (median > 0), median, 1.0))
  else:
    scale = jnp.float32(1.0)
  kernel = sum(jnp.exp(-distances / (float(b) * scale)) for b in bandwidths)
  # Signed weights: +w/n_s for source rows, -w/n_t for target rows; MMD^2 = s^T K s.
  source_w, target_w = weights[:num_source], weights[num_source:]
  signed = jnp.concatenate([source_w / jnp.maximum(jnp.sum(source_w), 1.0),
                            -target_w / jnp.maximum(jnp.sum(target_w), 1.0)])
  return signed @ kernel @ signed


def no_alignment(source_features: jax.Array, target_features: jax.Array, **_: object
                 ) -> jax.Array:
  """Zero (cross-entropy-only fine-tuning); ignores its inputs."""
  del source_features, target_features
  return jnp.zeros((), jnp.float32)


ALIGNMENT_LOSSES: dict[str, AlignmentLoss] = {
    "coral": coral_loss,
    "mmd": mmd_loss,
    "none": no_alignment,
}


def alignment_loss(name: str) -> AlignmentLoss:
  """The loss registered as `name` (config key `adapt.alignment`)."""
  if not isinstance(name, str) or name not in ALIGNMENT_LOSSES:
    raise ConfigError(f"adapt.alignment={name!r} is not valid; choose one of: "
                      f"{', '.join(ALIGNMENT_LOSSES)}")
  return ALIGNMENT_LOSSES[name]

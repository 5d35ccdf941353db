"""Unstructured magnitude pruning: masks, the gradual schedule and an optimizer that keeps them.

    masks = magnitude_masks(params, 0.9, scope='global')                   # one-shot, fixed
    tx = masked_optimizer(base_tx, masks); params = apply_masks(params, masks)
    tx = pruning_optimizer(make_optimizer(config.train, schedule), final_sparsity=0.9,
                           begin_step=0, end_step=2000, update_every=100)   # gradual
    tx = pruning_optimizer(base_tx, final_sparsity=0.9)                    # one-shot, in init
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=stats)
    state = state.replace(params=apply_masks(state.params, pruning_masks(state.opt_state)))
    sparsity_report(state.params)['total']['sparsity']

Only conv/dense kernels (leaves named `kernel` with ndim >= 2) are pruned; biases and BatchNorm
parameters always have all-ones masks. Masks are float32 1/0 arrays shaped like the params.

Both optimizers wrap any optax optimizer: the state holds the masks, gradients are masked before
the inner optimizer (so momentum never builds up on pruned weights), and every update sets pruned
weights to exactly 0 (-w). `masked_optimizer` keeps fixed masks (one-shot pruning);
`pruning_optimizer` recomputes them from magnitudes at the schedule's update steps, ranking
already-pruned weights first, so pruning never regrows a weight and the sparsity follows the
schedule exactly (with begin = end = 0 it is one-shot, masks from the starting weights in `init`).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adcorda_jax.quant.fake_quant import is_kernel, path_string

SCOPES = ("global", "layer")


def _check_fraction(value: Any, label: str) -> None:
  """Rejects Python numbers outside [0, 1]; traced values are the schedule's responsibility."""
  if isinstance(value, (int, float, np.number)) and not 0 <= value <= 1:
    raise ValueError(f"{label} must be in [0, 1], got {value!r}")


def _keep_largest(scores: jax.Array, sparsity: jax.Array) -> jax.Array:
  """1/0 over a 1-D score vector: the round(sparsity * n) lowest scores get 0 (stable ties)."""
  size = scores.shape[0]
  pruned = jnp.clip(jnp.round(jnp.asarray(sparsity, jnp.float32) * size), 0, size)
  ranks = jnp.zeros(size, jnp.int32).at[jnp.argsort(scores, stable=True)].set(
      jnp.arange(size, dtype=jnp.int32))
  return (ranks >= pruned.astype(jnp.int32)).astype(jnp.float32)


def magnitude_masks(params: Any, sparsity: float | jax.Array, scope: str = "global",
                    previous: Any = None) -> Any:
  """Float32 1/0 masks shaped like `params` that prune the smallest-|w| kernel weights.

  Args:
    params: a params pytree.
    sparsity: fraction of kernel weights pruned, in [0, 1] (may be traced, e.g. a schedule).
    scope: "global" ranks |w| over all kernels together (layers end up with different sparsity);
      "layer" prunes every kernel to `sparsity` separately.
    previous: masks to extend: weights they prune rank below every other weight, so they stay
      pruned as long as `sparsity` does not decrease.
  """
  if scope not in SCOPES:
    raise ValueError(f"pruning scope {scope!r} is not valid; choose one of: {', '.join(SCOPES)}")
  _check_fraction(sparsity, "sparsity")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  old = jax.tree.leaves(previous) if previous is not None else [None] * len(leaves)
  masks = [jnp.ones(np.shape(leaf), jnp.float32) for _, leaf in leaves]
  kernels = [i for i, (path, leaf) in enumerate(leaves) if is_kernel(path, leaf)]
  scores = []
  for i in kernels:
    score = jnp.abs(jnp.asarray(leaves[i][1], jnp.float32)).ravel()
    if old[i] is not None:
      score = jnp.where(jnp.ravel(old[i]) > 0, score, -1.0)
    scores.append(score)
  if scope == "global" and kernels:
    keep = _keep_largest(jnp.concatenate(scores), sparsity)
    pieces = jnp.split(keep, np.cumsum([s.shape[0] for s in scores])[:-1])
  else:
    pieces = [_keep_largest(score, sparsity) for score in scores]
  for i, piece in zip(kernels, pieces):
    masks[i] = piece.reshape(np.shape(leaves[i][1]))
  return jax.tree_util.tree_unflatten(treedef, masks)


def apply_masks(params: Any, masks: Any) -> Any:
  """`params` with every masked-out weight set to exactly 0."""
  return jax.tree.map(lambda p, m: jnp.where(m > 0, p, jnp.zeros_like(p)), params, masks)


def polynomial_sparsity(step: int | jax.Array, *, final_sparsity: float, begin_step: int,
                        end_step: int, initial_sparsity: float = 0.0,
                        power: int = 3) -> jax.Array:
  """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^power.

  Constant `initial_sparsity` before `begin_step` and `final_sparsity` from `end_step` on;
  `end_step == begin_step` jumps straight to the final sparsity (one-shot).
  """
  _check_fraction(initial_sparsity, "initial_sparsity")
  _check_fraction(final_sparsity, "final_sparsity")
  if initial_sparsity > final_sparsity:
    raise ValueError(f"initial_sparsity {initial_sparsity!r} exceeds final_sparsity "
                     f"{final_sparsity!r}; pruning never regrows weights")
  if not 0 <= begin_step <= end_step:
    raise ValueError(f"pruning steps need 0 <= begin_step <= end_step, got {begin_step}, "
                     f"{end_step}")
  step = jnp.asarray(step, jnp.float32)
  if end_step == begin_step:
    progress = (step >= begin_step).astype(jnp.float32)
  else:
    progress = jnp.clip((step - begin_step) / (end_step - begin_step), 0.0, 1.0)
  return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power


class PruningState(NamedTuple):
  """Optimizer state of `masked_optimizer`/`pruning_optimizer`: steps, masks, the inner state."""
  count: jax.Array
  masks: Any
  inner_state: optax.OptState


def _masking_transformation(tx: optax.GradientTransformation,
                            initial_masks: Callable[[Any], Any],
                            refresh: Callable[[jax.Array, Any, Any], Any] | None
                            ) -> optax.GradientTransformation:
  """`tx` with masked gradients and pruned weights held at 0; `refresh` may renew the masks."""

  def init(params):
    return PruningState(jnp.zeros([], jnp.int32), initial_masks(params), tx.init(params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("pruned optimizers need params in update() to hold pruned weights at 0")
    masks = state.masks if refresh is None else refresh(state.count, params, state.masks)
    grads = jax.tree.map(lambda g, m: g * m.astype(g.dtype), updates, masks)
    inner_updates, inner_state = tx.update(grads, state.inner_state, params)
    # Kept weights take the inner update; pruned ones move by -w, i.e. to exactly 0.
    new_updates = jax.tree.map(lambda u, p, m: jnp.where(m > 0, u, -p), inner_updates, params,
                               masks)
    return new_updates, PruningState(optax.safe_increment(state.count), masks, inner_state)

  return optax.GradientTransformation(init, update)


def masked_optimizer(tx: optax.GradientTransformation, masks: Any
                     ) -> optax.GradientTransformation:
  """`tx` with fixed `masks` (e.g. from `magnitude_masks`): pruned weights stay exactly 0.

  The masks live in the optimizer state; the first update already zeroes pruned weights that are
  not zero yet, but `apply_masks` the starting params to evaluate the pruned model before that.
  """
  fixed = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), masks)

  def initial_masks(params):
    if jax.tree.structure(params) != jax.tree.structure(fixed):
      raise ValueError("masks must have the structure of the params they prune")
    return fixed

  return _masking_transformation(tx, initial_masks, None)


def pruning_optimizer(tx: optax.GradientTransformation, *, final_sparsity: float,
                      begin_step: int = 0, end_step: int = 0, update_every: int = 100,
                      initial_sparsity: float = 0.0, power: int = 3,
                      scope: str = "global") -> optax.GradientTransformation:
  """`tx` with gradual (or one-shot) magnitude pruning; pruned weights held at exactly 0.

  Masks are recomputed from |w| at steps begin_step, begin_step + update_every, ... and at
  end_step, to `polynomial_sparsity` of that step; `init` computes them already when
  begin_step == 0 (one-shot pruning with the defaults: begin_step = end_step = 0). Works inside
  `jax.jit` (e.g. `TrainState.apply_gradients`).
  """
  if scope not in SCOPES:
    raise ValueError(f"pruning scope {scope!r} is not valid; choose one of: {', '.join(SCOPES)}")
  if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
    raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")

  def schedule(step):
    return polynomial_sparsity(step, final_sparsity=final_sparsity, begin_step=begin_step,
                               end_step=end_step, initial_sparsity=initial_sparsity,
                               power=power)

  schedule(0)  # Validates the schedule arguments now, not at the first traced step.

  def initial_masks(params):
    if begin_step == 0:
      return magnitude_masks(params, schedule(0), scope)
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.float32), params)

  def refresh(step, params, masks):
    due = (step >= begin_step) & (step <= end_step) & (
        ((step - begin_step) % update_every == 0) | (step == end_step))
    return jax.lax.cond(
        due, lambda: magnitude_masks(params, schedule(step), scope, previous=masks),
        lambda: masks)

  return _masking_transformation(tx, initial_masks, refresh)


def _find_masks(opt_state: Any) -> Any:
  if isinstance(opt_state, PruningState):
    return opt_state.masks
  children = opt_state.values() if isinstance(opt_state, dict) else (
      opt_state if isinstance(opt_state, (tuple, list)) else ())
  for child in children:
    found = _find_masks(child)
    if found is not None:
      return found
  return None


def pruning_masks(opt_state: Any) -> Any:
  """The current masks inside an optimizer state built with `pruning_optimizer`."""
  masks = _find_masks(opt_state)
  if masks is None:
    raise ValueError("optimizer state has no pruning masks; build the optimizer with "
                     "masked_optimizer or pruning_optimizer")
  return masks


def sparsity_report(params: Any) -> dict[str, dict[str, float]]:
  """{kernel path: {'size', 'zeros', 'sparsity'}} plus a 'total' entry over all kernels."""
  report: dict[str, dict[str, float]] = {}
  size_total = zeros_total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not is_kernel(path, leaf):
      continue
    values = np.asarray(leaf)
    size, zeros = int(values.size), int(np.count_nonzero(values == 0))
    report[path_string(path)] = {"size": size, "zeros": zeros,
                                 "sparsity": zeros / size if size else 0.0}
    size_total += size
    zeros_total += zeros
  report["total"] = {"size": size_total, "zeros": zeros_total,
                     "sparsity": zeros_total / size_total if size_total else 0.0}
  return report

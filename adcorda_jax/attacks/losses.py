"""What attacks optimize and how their outcome is scored.

Every attack *ascends* a per-example objective: the cross-entropy of the true label for untargeted
attacks, minus the cross-entropy of the target label for targeted ones (and for correction, whose
target is the true label), or AutoAttack's difference-of-logits ratios (DLR, targeted DLR), which
do not change when the logits are shifted or scaled. Success is judged from the logits of the
returned inputs.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from adcorda_jax.attacks import norms

# logits_fn(params, x) -> logits [N, num_classes]; params is any pytree, passed traced.
LogitsFn = Callable[[Any, jax.Array], jax.Array]


@flax.struct.dataclass
class AttackResult:
  """Outcome of an attack on a batch of N inputs.

  Attributes:
    adversarial: [N, ...] inputs, same shape/dtype as x, inside the eps-ball around x and in [0, 1].
    success: [N] bool; untargeted: prediction != label, targeted/correction: prediction == label.
    steps_used: [N] int32 gradient steps until success (summed over restarts), or all if never.
    perturbation_norm: [N] float32 norm (the attack's norm) of adversarial - x.
  """
  adversarial: jax.Array
  success: jax.Array
  steps_used: jax.Array
  perturbation_norm: jax.Array


def objective_from_logits(logits: jax.Array, labels: jax.Array, targeted: bool) -> jax.Array:
  """Per-example objective to ascend: +CE(labels) untargeted, -CE(labels) targeted."""
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  return -cross_entropy if targeted else cross_entropy


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Croce & Hein's DLR loss to ascend: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12).

  z_pi are the logits sorted in decreasing order; needs at least 3 classes.
  """
  logits = logits.astype(jnp.float32)
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  best_other = jnp.where(jnp.argmax(logits, axis=-1) == labels, ordered[:, 1], ordered[:, 0])
  return -(true - best_other) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def targeted_dlr_loss(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """Targeted DLR to ascend: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12); >= 4 classes."""
  logits = logits.astype(jnp.float32)
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  true = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  target = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return -(true - target) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12)


def ranked_class(logits: jax.Array, rank: jax.Array | int) -> jax.Array:
  """[N] int32: the class with the (rank+1)-th highest logit (rank 1 = the runner-up).

  AutoAttack's targets: ranks 1..k of the clean logits, i.e. the k most likely classes other
  than the predicted one (the true one, for the correctly classified points it attacks).
  """
  order = jnp.argsort(-logits.astype(jnp.float32), axis=-1, stable=True)
  return jnp.take(order, rank, axis=-1).astype(jnp.int32)


def is_success(logits: jax.Array, labels: jax.Array, targeted: bool) -> jax.Array:
  """[N] bool: the prediction hits the target (targeted) or misses the true label (untargeted)."""
  hit = jnp.argmax(logits, axis=-1) == labels
  return hit if targeted else ~hit


def loss_and_grad(objective_fn: Callable[[jax.Array], jax.Array], logits_fn: LogitsFn,
                  params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(objective_fn(logits) [N], logits, d objective / dx) in one forward and backward pass.

  The gradient of the batch sum equals the per-example gradients because examples do not
  interact in eval mode.
  """
  def total(inputs):
    logits = logits_fn(params, inputs)
    objective = objective_fn(logits)
    return jnp.sum(objective), (objective, logits)

  (_, (objective, logits)), grad = jax.value_and_grad(total, has_aux=True)(x)
  return objective, logits, grad


def objective_and_grad(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array,
                       targeted: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`loss_and_grad` of the cross-entropy objective (see `objective_from_logits`)."""
  return loss_and_grad(lambda logits: objective_from_logits(logits, labels, targeted),
                       logits_fn, params, x)


def score(logits_fn: LogitsFn, params: Any, x: jax.Array, adversarial: jax.Array,
          labels: jax.Array, steps_used: jax.Array, norm: str,
          targeted: bool) -> tuple[AttackResult, jax.Array]:
  """Scores the returned inputs with a fresh forward pass: (AttackResult, objective [N])."""
  logits = logits_fn(params, adversarial)
  result = AttackResult(
      adversarial=adversarial,
      success=is_success(logits, labels, targeted),
      steps_used=steps_used.astype(jnp.int32),
      perturbation_norm=norms.perturbation_norm(adversarial - x, norm))
  return result, objective_from_logits(logits, labels, targeted)


def pick_per_example(take_new: jax.Array, new: Any, old: Any) -> Any:
  """Per-example `where(take_new, new, old)` over matching pytrees of [N, ...] leaves."""
  def pick(a, b):
    return jnp.where(take_new.reshape(take_new.shape + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(pick, new, old)

"""What attacks optimize and how their outcome is scored.

Every attack *ascends* a per-example objective: the cross-entropy of the true label for untargeted
attacks, minus the cross-entropy of the target label for targeted ones (and for correction, whose
target is the true label). Success is judged from the logits of the returned inputs.
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


def is_success(logits: jax.Array, labels: jax.Array, targeted: bool) -> jax.Array:
  """[N] bool: the prediction hits the target (targeted) or misses the true label (untargeted)."""
  hit = jnp.argmax(logits, axis=-1) == labels
  return hit if targeted else ~hit


def objective_and_grad(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array,
                       targeted: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(objective [N], logits, d objective / dx) in one forward and backward pass.

  The gradient of the batch sum equals the per-example gradients because examples do not
  interact in eval mode.
  """
  def total(inputs):
    logits = logits_fn(params, inputs)
    objective = objective_from_logits(logits, labels, targeted)
    return jnp.sum(objective), (objective, logits)

  (_, (objective, logits)), grad = jax.value_and_grad(total, has_aux=True)(x)
  return objective, logits, grad


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

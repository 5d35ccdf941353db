"""AdCorDA correction: the smallest-effort input change that makes the model right.

Stage 1 of AdCorDA (adversarial correction, then domain adaptation) replaces each training input
the model misclassifies by a nearby input it classifies correctly. That is a targeted PGD whose
target is the true label; inputs already classified correctly are returned untouched.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adcorda_jax.attacks.compile import attack_jit
from adcorda_jax.attacks import validation
from adcorda_jax.attacks.losses import AttackResult, LogitsFn, pick_per_example
from adcorda_jax.attacks.pgd import as_budget, pgd_run, prng_key, run_restarts, starting_point


@attack_jit(static_argnames=("logits_fn", "steps", "norm", "random_start"))
def _correct(logits_fn, params, x, labels, key, eps, step_size, *, steps, norm, random_start):
  x32 = x.astype(jnp.float32)
  already_right = jnp.argmax(logits_fn(params, x32), axis=-1) == labels

  def run_once(run_key, adversarial, frozen):
    start = pick_per_example(frozen, adversarial,
                             starting_point(run_key, x32, eps, norm, random_start))
    return pgd_run(logits_fn, params, x32, labels, start, frozen, eps, step_size, steps=steps,
                   norm=norm, targeted=True, early_stop=True)

  result = run_restarts(run_once, logits_fn, params, x32, labels, key, restarts=1, steps=steps,
                        norm=norm, targeted=True, frozen=already_right)
  return AttackResult(
      adversarial=pick_per_example(already_right, x, result.adversarial.astype(x.dtype)),
      success=result.success | already_right,
      steps_used=jnp.where(already_right, 0, result.steps_used),
      perturbation_norm=jnp.where(already_right, 0.0, result.perturbation_norm))


def correct(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array, *,
            eps: float | jax.Array, step_size: float | jax.Array, steps: int,
            norm: str = "linf", key: jax.Array | None = None,
            random_start: bool = False) -> AttackResult:
  """Moves each misclassified input within its eps-ball until the model predicts its `labels`.

  Descends the cross-entropy of the true label with `steps` PGD steps of `step_size`, stopping per
  example as soon as the prediction is right. Correctly classified inputs come back bit-identical
  with success=True, steps_used=0 and norm 0. Without `random_start` (the default) the result is
  deterministic and the perturbations are as small as the step schedule allows.
  """
  validation.check_attack_inputs(logits_fn, params, x, labels, eps=eps, norm=norm)
  batch_size = np.shape(x)[0]
  validation.check_budget(step_size, "step_size", batch_size, allow_zero=False)
  validation.check_positive_int(steps, "steps")
  validation.check_key(key, required=random_start, reason=" when random_start=True")
  return _correct(logits_fn, params, jnp.asarray(x), jnp.asarray(labels, jnp.int32),
                  prng_key(key), as_budget(eps, batch_size), as_budget(step_size, batch_size),
                  steps=int(steps), norm=norm, random_start=bool(random_start))

"""AdCorDA correction: the smallest-effort input change that makes the model right.

Stage 1 of AdCorDA (adversarial correction, then domain adaptation) replaces each training input
the model misclassifies by a nearby input it classifies correctly. That is a targeted PGD whose
target is the true label; inputs already classified correctly are returned untouched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adcorda_jax import config_checks
from adcorda_jax.attacks.compile import attack_jit
from adcorda_jax.attacks import validation
from adcorda_jax.attacks.losses import AttackResult, LogitsFn, pick_per_example
from adcorda_jax.attacks.pgd import (as_budget, describe_step_rule, pgd_run, prng_key,
                                     read_step_rule, run_restarts, starting_point)
from adcorda_jax.attacks.registry import AttackMethod, describe_steps, read_flag, register

if TYPE_CHECKING:
  from adcorda_jax.attacks.specs import AttackSpec


@attack_jit(static_argnames=("logits_fn", "steps", "norm", "random_start"))
def _correct(logits_fn, params, x, labels, key, eps, step_size, *, steps, norm, random_start):
  x32 = x.astype(jnp.float32)
  already_right = jnp.argmax(logits_fn(params, x32), axis=-1) == labels

  def run_once(index, run_key, adversarial, frozen):
    del index  # One attempt.
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


# The registry entry (see `adcorda_jax.attacks.registry`): success means "now right".


def _read_correct(section: ml_collections.ConfigDict, prefix: str) -> dict[str, Any]:
  # early_stop is read (it is part of the spec and its fingerprint) though correction always
  # stops an example once it is right.
  return {"steps": config_checks.positive_int(section, "steps", prefix, default=10),
          **read_step_rule(section, prefix, random_start=False),
          "early_stop": read_flag(section, "early_stop", prefix, default=True)}


def _run_correct(spec: AttackSpec, logits_fn: LogitsFn, params: Any, x: jax.Array,
                 labels: jax.Array, key: jax.Array, eps: jax.Array) -> AttackResult:
  return _correct(logits_fn, params, x, labels, key, eps, spec.step_size_for(eps),
                  steps=spec.steps, norm=spec.norm, random_start=spec.random_start)


register(AttackMethod(
    name="correct", section="correct", read=_read_correct, run=_run_correct,
    describe=lambda spec: describe_steps(spec) + describe_step_rule(spec),
    targets_true_label=True))

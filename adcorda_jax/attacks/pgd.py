"""FGSM and PGD (Madry et al. 2018) as single compiled programs with per-example early stopping.

An attack iterates inside one `lax.while_loop` under `jax.jit`. Examples that reach their goal
are frozen (their input no longer changes) and the loop ends once every example is done or the
steps run out. Restarts run the loop again from new random starts for the examples that are still
unbroken, keeping per example the first success or else the highest objective.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adcorda_jax import config_checks
from adcorda_jax.attacks.compile import attack_jit
from adcorda_jax.attacks import norms, validation
from adcorda_jax.attacks.losses import (AttackResult, LogitsFn, is_success, objective_and_grad,
                                        pick_per_example, score)
from adcorda_jax.attacks.registry import (AttackMethod, describe_restarts, describe_steps,
                                          read_flag, register)

if TYPE_CHECKING:
  from adcorda_jax.attacks.specs import AttackSpec

# run_once(index, key, adversarial, frozen) -> (adversarial, steps_used): attempt `index` (a
# restart, or a target class) in which the `frozen` examples keep `adversarial` (0 steps) and the
# others start afresh from `key`.
RunOnce = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def as_budget(value: Any, batch_size: int) -> jax.Array:
  """A scalar or [N] budget (eps, step size) as a float32 [N] array."""
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (batch_size,))


def prng_key(key: jax.Array | None) -> jax.Array:
  """`key`, or a fixed placeholder for deterministic attacks that never draw from it."""
  return jax.random.key(0) if key is None else key


def starting_point(key: jax.Array, x: jax.Array, eps: jax.Array, norm: str,
                   random: bool) -> jax.Array:
  """A uniform random point of the eps-ball (`random`) or x itself."""
  return norms.random_start(key, x, eps, norm) if random else x


def run_restarts(run_once: RunOnce, logits_fn: LogitsFn, params: Any, x: jax.Array,
                 labels: jax.Array, key: jax.Array, *, restarts: int, steps: int, norm: str,
                 targeted: bool, frozen: jax.Array | None = None) -> AttackResult:
  """Runs `run_once` `restarts` times (attempts 0..restarts-1) and keeps the best per example.

  Examples already successful are frozen in later restarts, so the first success is kept; for
  the others the run with the highest objective wins. `steps_used` sums over restarts. Examples
  in the initial `frozen` mask are never attacked (they come back as x).
  """
  if frozen is None:
    frozen = jnp.zeros(x.shape[:1], bool)

  def attempt(index, adversarial, skip):
    # fold_in: restart r draws the same start whatever the number of restarts.
    candidate, used = run_once(index, jax.random.fold_in(key, index), adversarial, skip)
    result, objective = score(logits_fn, params, x, candidate, labels, used, norm, targeted)
    used = jnp.where(result.success | skip, result.steps_used, steps)
    return result.replace(steps_used=used), objective

  best, best_objective = attempt(0, x, frozen)

  def next_restart(index, carry):
    best, best_objective = carry
    result, objective = attempt(index, best.adversarial, frozen | best.success)
    better = ~best.success & ~frozen & (result.success | (objective > best_objective))
    chosen, objective = pick_per_example(better, (result, objective), (best, best_objective))
    return chosen.replace(steps_used=best.steps_used + result.steps_used), objective

  best, _ = jax.lax.fori_loop(1, restarts, next_restart, (best, best_objective))
  return best


def pgd_run(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array,
            start: jax.Array, frozen: jax.Array, eps: jax.Array, step_size: jax.Array, *,
            steps: int, norm: str, targeted: bool,
            early_stop: bool) -> tuple[jax.Array, jax.Array]:
  """One PGD run from `start`: (adversarial, steps until first success or `steps`).

  With `early_stop` an example stops moving once successful; without it every non-frozen example
  takes all steps and the last iterate is returned (plain Madry et al. PGD).
  """
  step = norms.per_example(step_size, x)

  def active(hit):
    return ~hit if early_stop else ~frozen

  def cond(state):
    iteration, _, hit, _ = state
    return (iteration < steps) & jnp.any(active(hit))

  def body(state):
    iteration, adversarial, hit, first_success = state
    _, logits, grad = objective_and_grad(logits_fn, params, adversarial, labels, targeted)
    newly = is_success(logits, labels, targeted) & ~hit
    first_success = jnp.where(newly, iteration, first_success)
    hit = hit | newly
    moved = norms.project(adversarial + step * norms.ascent_direction(grad, norm), x, eps, norm)
    adversarial = pick_per_example(active(hit), moved, adversarial)
    return iteration + 1, adversarial, hit, first_success

  init = (jnp.int32(0), start.astype(jnp.float32), frozen, jnp.zeros(x.shape[:1], jnp.int32))
  _, adversarial, hit, first_success = jax.lax.while_loop(cond, body, init)
  return adversarial, jnp.where(hit, first_success, steps)


@attack_jit(static_argnames=("logits_fn", "steps", "norm", "targeted",
                                             "random_start", "restarts", "early_stop"))
def _pgd(logits_fn, params, x, labels, key, eps, step_size, *, steps, norm, targeted,
         random_start, restarts, early_stop):
  x32 = x.astype(jnp.float32)

  def run_once(index, run_key, adversarial, frozen):
    del index  # Every restart is the same attack from a new start.
    start = pick_per_example(frozen, adversarial,
                             starting_point(run_key, x32, eps, norm, random_start))
    return pgd_run(logits_fn, params, x32, labels, start, frozen, eps, step_size, steps=steps,
                   norm=norm, targeted=targeted, early_stop=early_stop)

  result = run_restarts(run_once, logits_fn, params, x32, labels, key, restarts=restarts,
                        steps=steps, norm=norm, targeted=targeted)
  return result.replace(adversarial=result.adversarial.astype(x.dtype))


def pgd(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array, *,
        key: jax.Array | None, eps: float | jax.Array, step_size: float | jax.Array, steps: int,
        norm: str = "linf", targeted: bool = False, random_start: bool = True,
        restarts: int = 1, early_stop: bool = True) -> AttackResult:
  """Projected gradient descent in the `norm` ball of radius `eps` (scalar or per example [N]).

  Ascends the cross-entropy of `labels` (untargeted) or descends that of the target `labels`
  (`targeted`) for `steps` steps of size `step_size`, from a uniform random start in the ball
  (`random_start`, needs `key`), `restarts` times. Compiled once per static configuration and
  `logits_fn` object; params, x, eps and step size are traced.
  """
  validation.check_attack_inputs(logits_fn, params, x, labels, eps=eps, norm=norm)
  batch_size = np.shape(x)[0]
  validation.check_budget(step_size, "step_size", batch_size, allow_zero=False)
  validation.check_positive_int(steps, "steps")
  validation.check_positive_int(restarts, "restarts")
  validation.check_key(key, required=random_start, reason=" when random_start=True")
  return _pgd(logits_fn, params, jnp.asarray(x), jnp.asarray(labels, jnp.int32), prng_key(key),
              as_budget(eps, batch_size), as_budget(step_size, batch_size), steps=int(steps),
              norm=norm, targeted=bool(targeted), random_start=bool(random_start),
              restarts=int(restarts), early_stop=bool(early_stop))


@attack_jit(static_argnames=("logits_fn", "norm", "targeted"))
def _fgsm(logits_fn, params, x, labels, eps, *, norm, targeted):
  x32 = x.astype(jnp.float32)
  _, _, grad = objective_and_grad(logits_fn, params, x32, labels, targeted)
  step = norms.per_example(eps, x32) * norms.ascent_direction(grad, norm)
  adversarial = norms.project(x32 + step, x32, eps, norm)
  steps_used = jnp.ones(x.shape[:1], jnp.int32)
  result, _ = score(logits_fn, params, x32, adversarial, labels, steps_used, norm, targeted)
  return result.replace(adversarial=adversarial.astype(x.dtype))


def fgsm(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array, *,
         eps: float | jax.Array, norm: str = "linf", targeted: bool = False) -> AttackResult:
  """Fast gradient (sign) method: one steepest-ascent step of size `eps` from x, no random start.

  `steps_used` is 1 for every example (the single step is taken regardless of success).
  """
  validation.check_attack_inputs(logits_fn, params, x, labels, eps=eps, norm=norm)
  return _fgsm(logits_fn, params, jnp.asarray(x), jnp.asarray(labels, jnp.int32),
               as_budget(eps, np.shape(x)[0]), norm=norm, targeted=bool(targeted))


# Registry entries (see `adcorda_jax.attacks.registry`): how an AttackSpec reads, runs and
# describes FGSM and PGD. The step-size rule is shared with correction.


def read_step_rule(section: ml_collections.ConfigDict, prefix: str,
                   random_start: bool) -> dict[str, Any]:
  """The PGD-style step size rule and random start (default `random_start`) of a section."""
  return {
      "step_size": config_checks.positive_float(section, "step_size", prefix, default=0.0,
                                                allow_zero=True),
      "step_size_factor": config_checks.positive_float(section, "step_size_factor", prefix,
                                                       default=2.5),
      "random_start": read_flag(section, "random_start", prefix, default=random_start)}


def describe_step_rule(spec: AttackSpec) -> str:
  """The step-size rule as a label suffix: ` of 2.5*eps/10, random start` or ` of 0.01`."""
  rule = (f"{spec.step_size:g}" if spec.step_size > 0
          else f"{spec.step_size_factor:g}*eps/{spec.steps}")
  return f" of {rule}" + (", random start" if spec.random_start else "")


def _run_fgsm(spec: AttackSpec, logits_fn: LogitsFn, params: Any, x: jax.Array,
              labels: jax.Array, key: jax.Array, eps: jax.Array) -> AttackResult:
  return _fgsm(logits_fn, params, x, labels, eps, norm=spec.norm, targeted=False)


def _read_pgd(section: ml_collections.ConfigDict, prefix: str) -> dict[str, Any]:
  return {"steps": config_checks.positive_int(section, "steps", prefix, default=10),
          **read_step_rule(section, prefix, random_start=True),
          "restarts": config_checks.positive_int(section, "restarts", prefix, default=1),
          "early_stop": read_flag(section, "early_stop", prefix, default=True)}


def _run_pgd(spec: AttackSpec, logits_fn: LogitsFn, params: Any, x: jax.Array,
             labels: jax.Array, key: jax.Array, eps: jax.Array) -> AttackResult:
  return _pgd(logits_fn, params, x, labels, key, eps, spec.step_size_for(eps), steps=spec.steps,
              norm=spec.norm, targeted=False, random_start=spec.random_start,
              restarts=spec.restarts, early_stop=spec.early_stop)


register(AttackMethod(
    name="fgsm", section="fgsm", run=_run_fgsm,
    # One step of size eps from x: nothing to read.
    read=lambda section, prefix: {"steps": 1, "random_start": False},
    describe=lambda spec: f"fgsm {spec.norm}"))
register(AttackMethod(
    name="pgd", section="pgd", read=_read_pgd, run=_run_pgd,
    describe=lambda spec: describe_steps(spec) + describe_step_rule(spec)
    + describe_restarts(spec)))

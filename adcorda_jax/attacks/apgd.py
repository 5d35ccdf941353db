"""APGD (Croce & Hein 2020, Algorithm 1): step-size-free PGD with momentum and restarts.

Three registered attacks share one loop and differ in the objective ascended: `apgd_ce` (the
cross-entropy of the true label), `apgd_dlr` (the DLR loss) and `apgd_t` (the targeted DLR loss,
one run per target class: the k classes with the highest clean logits after the predicted one,
each run on the examples the previous targets left unbroken, as AutoAttack's APGD-T). Success is
always "misclassified" (any wrong class).

The step size starts at 2*eps and is halved at checkpoints w_j = ceil(p_j * steps), with p_0 = 0,
p_1 = 0.22 and p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), whenever the objective rose in
fewer than rho of the steps since the last checkpoint, or when neither the step size nor the best
objective changed since then; the iterate then restarts from the best point found. The whole run
is one `lax.while_loop` with the checkpoint schedule precomputed as a static array.

Choices where the paper leaves room (following the authors' reference code unless noted):
  * the start is uniform in the eps-ball (ours; the reference scales noise to the boundary);
  * halving for "no progress" is disabled at the first checkpoint; a restart from the best point
    also restores its gradient; checkpoint j falls after w_j updates;
  * the oscillation test is strict (count < rho * interval, as in the paper; the reference
    uses <=), and after a restart the next increase is judged against the best objective;
  * an example that is misclassified stops moving (per-example early stopping, ours) and its
    first misclassified point is returned, as the reference does; unbroken examples return
    their highest-loss point. Without early stopping the results are identical, only slower.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adcorda_jax import config_checks
from adcorda_jax.attacks.compile import attack_jit
from adcorda_jax.attacks import compaction, norms, validation
from adcorda_jax.attacks.losses import (AttackResult, LogitsFn, dlr_loss, is_success,
                                        loss_and_grad, objective_from_logits, pick_per_example,
                                        ranked_class, targeted_dlr_loss)
from adcorda_jax.attacks.pgd import as_budget, run_restarts
from adcorda_jax.errors import ConfigError
from adcorda_jax.attacks.registry import (AttackMethod, describe_restarts, describe_steps,
                                          read_flag, register)

if TYPE_CHECKING:
  from adcorda_jax.attacks.specs import AttackSpec

LOSSES = ("ce", "dlr", "dlr_targeted")
# The fewest classes each loss is defined for (DLR reads the 3rd, targeted DLR the 4th logit).
MIN_CLASSES = {"ce": 2, "dlr": 3, "dlr_targeted": 4}


def checkpoint_schedule(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Host-side schedule: (is_checkpoint [steps] bool, interval [steps] float32).

  `is_checkpoint[i]` marks the iteration after which w_j updates are complete; `interval[i]` is
  w_j - w_{j-1}, the number of updates the "fraction of increases" test looks back over.
  """
  fractions = [0.0, 0.22]
  while fractions[-1] < 1.0:
    fractions.append(fractions[-1] + max(fractions[-1] - fractions[-2] - 0.03, 0.06))
  # The epsilon keeps e.g. 0.22 * 100 = 22.000000000000004 from rounding up to 23.
  points = sorted({math.ceil(p * steps - 1e-9) for p in fractions if p * steps - 1e-9 <= steps})
  is_checkpoint = np.zeros(steps, bool)
  interval = np.zeros(steps, np.float32)
  for previous, point in zip(points, points[1:]):
    is_checkpoint[point - 1] = True
    interval[point - 1] = point - previous
  return is_checkpoint, interval


def apgd_run(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array,
             start: jax.Array, frozen: jax.Array, eps: jax.Array, rho: jax.Array,
             momentum: jax.Array, *, steps: int, norm: str, early_stop: bool, loss: str = "ce",
             targets: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One APGD run from `start`: (adversarial, steps until first success or `steps`).

  Ascends `loss` (one of LOSSES; dlr_targeted toward `targets`). With `early_stop`, each step
  evaluates only the examples still unbroken (`compaction.on_active`).
  """
  targets = labels if targets is None else targets

  def evaluate(points, active):
    def batch_loss(batch):
      objective = loss_objective(loss, batch["labels"], batch["targets"])
      return loss_and_grad(objective, logits_fn, params, batch["points"])
    return compaction.on_active(batch_loss, active,
                                {"points": points, "labels": labels, "targets": targets})

  is_checkpoint, interval = (jnp.asarray(a) for a in checkpoint_schedule(steps))
  objective, logits, grad = evaluate(start, jnp.ones(labels.shape, bool))
  hit = frozen | is_success(logits, labels, False)

  def active(hit):
    return ~hit if early_stop else ~frozen

  def cond(state):
    return (state["iteration"] < steps) & jnp.any(active(state["hit"]))

  def body(state):
    iteration, current, moving = state["iteration"], state["current"], active(state["hit"])
    step = norms.per_example(state["step_size"], x)
    weight = jnp.where(iteration == 0, 1.0, momentum)
    target = norms.project(current + step * norms.ascent_direction(state["grad"], norm), x, eps,
                           norm)
    candidate = norms.project(current + weight * (target - current)
                              + (1.0 - weight) * (current - state["previous"]), x, eps, norm)
    new = pick_per_example(moving, candidate, current)
    # Rows of examples not moving may come back as zeros: they are masked below (`hit` ones
    # return their first successful point, frozen ones their start).
    objective, logits, grad = evaluate(new, moving)

    newly = is_success(logits, labels, False) & ~state["hit"]
    hit = state["hit"] | newly
    increases = state["increases"] + (objective > state["objective"]).astype(jnp.int32)
    improved = objective > state["best_objective"]
    best, best_objective, best_grad = pick_per_example(
        improved, (new, objective, grad),
        (state["best"], state["best_objective"], state["best_grad"]))

    at_checkpoint = is_checkpoint[iteration]
    oscillating = increases < rho * interval[iteration]
    stalled = ~state["reduced_last"] & (best_objective <= state["best_objective_last"])
    reduce = at_checkpoint & (oscillating | stalled) & active(hit)
    following, following_objective, following_grad = pick_per_example(
        reduce, (best, best_objective, best_grad), (new, objective, grad))
    return dict(
        iteration=iteration + 1, current=following, previous=current, grad=following_grad,
        objective=following_objective,
        best=best, best_objective=best_objective, best_grad=best_grad,
        step_size=jnp.where(reduce, state["step_size"] / 2, state["step_size"]),
        increases=jnp.where(at_checkpoint, 0, increases),
        reduced_last=jnp.where(at_checkpoint, reduce, state["reduced_last"]),
        best_objective_last=jnp.where(at_checkpoint, best_objective,
                                      state["best_objective_last"]),
        hit=hit, first_success=jnp.where(newly, iteration + 1, state["first_success"]),
        found=pick_per_example(newly, new, state["found"]))

  batch = x.shape[:1]
  init = dict(
      iteration=jnp.int32(0), current=start, previous=start, grad=grad, objective=objective,
      best=start, best_objective=objective, best_grad=grad, step_size=2.0 * eps,
      increases=jnp.zeros(batch, jnp.int32), reduced_last=jnp.ones(batch, bool),
      best_objective_last=objective, hit=hit, first_success=jnp.zeros(batch, jnp.int32),
      found=start)
  final = jax.lax.while_loop(cond, body, init)
  adversarial = pick_per_example(final["hit"], final["found"], final["best"])
  return adversarial, jnp.where(final["hit"], final["first_success"], steps)


def loss_objective(loss: str, labels: jax.Array,
                   targets: jax.Array | None = None) -> Callable[[jax.Array], jax.Array]:
  """logits -> the per-example objective APGD ascends for `loss` (one of LOSSES)."""
  if loss == "ce":
    return lambda logits: objective_from_logits(logits, labels, False)
  if loss == "dlr":
    return lambda logits: dlr_loss(logits, labels)
  return lambda logits: targeted_dlr_loss(logits, labels, targets)


@attack_jit(static_argnames=("logits_fn", "steps", "norm", "restarts", "early_stop", "loss",
                             "target_classes"))
def _apgd(logits_fn, params, x, labels, key, eps, rho, momentum, *, steps, norm, restarts,
          early_stop, loss="ce", target_classes=1):
  """APGD with `loss`; for dlr_targeted, `restarts` runs for each of `target_classes` targets."""
  x32 = x.astype(jnp.float32)
  clean_logits = logits_fn(params, x32) if loss == "dlr_targeted" else None

  def run_once(index, run_key, adversarial, frozen):
    targets = None
    if loss == "dlr_targeted":  # Attempt i: target rank 1 + i // restarts.
      targets = ranked_class(clean_logits, 1 + index // restarts)
    start = pick_per_example(frozen, adversarial, norms.random_start(run_key, x32, eps, norm))
    return apgd_run(logits_fn, params, x32, labels, start, frozen, eps, rho, momentum,
                    steps=steps, norm=norm, early_stop=early_stop, loss=loss, targets=targets)

  attempts = restarts * (target_classes if loss == "dlr_targeted" else 1)
  result = run_restarts(run_once, logits_fn, params, x32, labels, key, restarts=attempts,
                        steps=steps, norm=norm, targeted=False)
  return result.replace(adversarial=result.adversarial.astype(x.dtype))


def _check_classes(logits_fn: LogitsFn, params: Any, x: Any, loss: str) -> int:
  """The model's class count, or a ConfigError if `loss` needs more classes."""
  classes = validation.num_classes(logits_fn, params, x)
  if classes < MIN_CLASSES[loss]:
    raise ConfigError(
        f"the {loss} loss needs at least {MIN_CLASSES[loss]} classes; the model has {classes}")
  return classes


def apgd(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array, *,
         key: jax.Array, eps: float | jax.Array, steps: int = 100, norm: str = "linf",
         loss: str = "ce", restarts: int = 1, target_classes: int = 9, rho: float = 0.75,
         momentum: float = 0.75, early_stop: bool = True) -> AttackResult:
  """APGD within the `norm` eps-ball, ascending `loss`: ce, dlr or dlr_targeted (APGD-T).

  Needs no step size; `rho` is the checkpoint threshold and `momentum` the paper's alpha.
  Restarts draw new random starts (from `key`) for the examples still unbroken. With
  dlr_targeted, each of the `target_classes` most likely wrong classes (capped at classes - 1)
  gets `restarts` runs in turn. AutoAttack's settings are the defaults (100 steps).
  """
  validation.check_attack_inputs(logits_fn, params, x, labels, eps=eps, norm=norm)
  if loss not in LOSSES:
    raise ConfigError(f"loss={loss!r} is not valid; choose one of: "
                                 f"{', '.join(LOSSES)}")
  validation.check_positive_int(steps, "steps")
  validation.check_positive_int(restarts, "restarts")
  validation.check_positive_int(target_classes, "target_classes")
  validation.check_unit_interval(rho, "rho")
  validation.check_unit_interval(momentum, "momentum")
  validation.check_key(key, required=True, reason=" (APGD always starts at random)")
  classes = _check_classes(logits_fn, params, x, loss)
  return _apgd(logits_fn, params, jnp.asarray(x), jnp.asarray(labels, jnp.int32), key,
               as_budget(eps, np.shape(x)[0]), jnp.asarray(rho, jnp.float32),
               jnp.asarray(momentum, jnp.float32), steps=int(steps), norm=norm,
               restarts=int(restarts), early_stop=bool(early_stop), loss=loss,
               target_classes=min(int(target_classes), classes - 1))


def apgd_ce(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array, *,
            key: jax.Array, eps: float | jax.Array, steps: int, norm: str = "linf",
            restarts: int = 1, rho: float = 0.75, momentum: float = 0.75,
            early_stop: bool = True) -> AttackResult:
  """Untargeted APGD on the cross-entropy of the true `labels` (`apgd` with loss='ce')."""
  return apgd(logits_fn, params, x, labels, key=key, eps=eps, steps=steps, norm=norm,
              loss="ce", restarts=restarts, rho=rho, momentum=momentum, early_stop=early_stop)


def apgd_dlr(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array, *,
             key: jax.Array, eps: float | jax.Array, steps: int = 100, norm: str = "linf",
             restarts: int = 1, **kwargs: Any) -> AttackResult:
  """Untargeted APGD on the DLR loss (`apgd` with loss='dlr'); needs 3+ classes."""
  return apgd(logits_fn, params, x, labels, key=key, eps=eps, steps=steps, norm=norm,
              loss="dlr", restarts=restarts, **kwargs)


def apgd_t(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array, *,
           key: jax.Array, eps: float | jax.Array, steps: int = 100, norm: str = "linf",
           target_classes: int = 9, restarts: int = 1, **kwargs: Any) -> AttackResult:
  """APGD-T: targeted DLR toward each of the `target_classes` runner-up classes in turn."""
  return apgd(logits_fn, params, x, labels, key=key, eps=eps, steps=steps, norm=norm,
              loss="dlr_targeted", target_classes=target_classes, restarts=restarts, **kwargs)


# Registry entries (see `adcorda_jax.attacks.registry`): apgd_ce and apgd_dlr read section
# `apgd`, apgd_t section `apgd_t` (it adds target_classes).
_LOSS_OF = {"apgd_ce": "ce", "apgd_dlr": "dlr", "apgd_t": "dlr_targeted"}


def _read_apgd(section: ml_collections.ConfigDict, prefix: str) -> dict[str, Any]:
  return {"steps": config_checks.positive_int(section, "steps", prefix, default=100),
          "restarts": config_checks.positive_int(section, "restarts", prefix, default=1),
          "rho": config_checks.unit_fraction(section, "rho", prefix, default=0.75),
          "momentum": config_checks.unit_fraction(section, "momentum", prefix, default=0.75),
          "early_stop": read_flag(section, "early_stop", prefix, default=True)}


def _read_apgd_t(section: ml_collections.ConfigDict, prefix: str) -> dict[str, Any]:
  return {**_read_apgd(section, prefix),
          "target_classes": config_checks.positive_int(section, "target_classes", prefix,
                                                       default=9)}


def _run_apgd(spec: AttackSpec, logits_fn: LogitsFn, params: Any, x: jax.Array,
              labels: jax.Array, key: jax.Array, eps: jax.Array) -> AttackResult:
  loss = _LOSS_OF[spec.name]
  target_classes = 1
  if loss == "dlr_targeted":  # Capped by the class count, known from the logits' shape.
    classes = jax.eval_shape(logits_fn, params, x).shape[-1]
    target_classes = min(spec.target_classes, classes - 1)
  return _apgd(logits_fn, params, x, labels, key, eps, jnp.float32(spec.rho),
               jnp.float32(spec.momentum), steps=spec.steps, norm=spec.norm,
               restarts=spec.restarts, early_stop=spec.early_stop, loss=loss,
               target_classes=target_classes)


def _describe_targets(spec: AttackSpec) -> str:
  return f", {spec.target_classes} target classes" if spec.name == "apgd_t" else ""


for _name in _LOSS_OF:
  register(AttackMethod(
      name=_name, section="apgd_t" if _name == "apgd_t" else "apgd",
      read=_read_apgd_t if _name == "apgd_t" else _read_apgd, run=_run_apgd,
      min_classes=MIN_CLASSES[_LOSS_OF[_name]],
      describe=lambda spec: describe_steps(spec) + _describe_targets(spec)
      + describe_restarts(spec)))

"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein 2020), linf and l2.

FAB looks for the smallest perturbation that changes the prediction. For a target class t it
linearizes the boundary z_t - z_y = 0 at the current iterate, projects both the iterate and the
clean input x onto that hyperplane intersected with the image box [0, 1] (minimal-norm
projections, `minimal_step_to_hyperplane`), and moves to a convex combination of the two
(overshot by `eta`), weighted towards x by at most `alpha_max`. Whenever the iterate is
misclassified it is kept if it is the closest such point so far and then pulled back towards x by
`beta`. As AutoAttack runs it (`fab-t` of its standard version), one run per target class (the
2nd..(k+1)-th highest clean logit) is made on the points still robust, and a point counts as
broken only when its closest misclassified point lies within eps ("found within eps"); the others
come back as x. The whole attack (targets, restarts, iterations) is one compiled program: a
`lax.fori_loop` over the (target, restart) runs around a `lax.while_loop` over the iterations,
with broken examples frozen.

Choices where we deviate from or add to the reference (AutoAttack's `fab_base.py`):
  * the projections solve the same problems (`projection_linf`, `projection_l2`) with a
    different, loop-free method: the constraint is a monotone piecewise-linear function of one
    multiplier, evaluated at all its sorted breakpoints with cumulative sums, and the segment
    holding the solution is found by counting, instead of a bisection over the sorted indices;
    where the box cannot reach the hyperplane both return the box corner closest to it;
  * eps may differ per example; the random start of later restarts (x + eps/2 times a random
    direction of unit norm, as in the reference) uses each example's eps;
  * `steps_used` counts the gradient steps, summed over the runs, until the first
    misclassified point within eps was found (all steps of every run if never); a run still
    takes all its iterations to shrink the perturbation, as in the reference;
  * success is re-judged from the logits of the returned inputs (prediction != label), and the
    result is projected onto the eps-ball and box as a guard (a no-op for found points);
  * the target classes come from `lax.top_k` of the clean logits (ties go to the lower class).
With one restart, eps enters only the final "within eps" test and the choice of which points the
next target attacks, so success never decreases as eps grows (same key, same inputs).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adcorda_jax import config_checks
from adcorda_jax.attacks import norms, validation
from adcorda_jax.attacks.compile import attack_jit
from adcorda_jax.attacks.losses import AttackResult, LogitsFn, pick_per_example, score
from adcorda_jax.attacks.pgd import as_budget, prng_key
from adcorda_jax.attacks.registry import AttackMethod, describe_restarts, describe_steps, register
from adcorda_jax.errors import ConfigError

if TYPE_CHECKING:
  from adcorda_jax.attacks.specs import AttackSpec

# Stands in for "unbounded" in the projections: finite, so that 0 * _UNBOUNDED stays 0.
_UNBOUNDED = 1e30
# The reference's floor on the projection norms in the step weight alpha.
_MIN_NORM = 1e-8


def _water_level(weight: jax.Array, cap: jax.Array, needed: jax.Array) -> jax.Array:
  """[M]: the smallest lam >= 0 with sum_i weight_i * min(lam, cap_i) >= needed, per row.

  weight, cap >= 0 are [M, D], needed >= 0 is [M]. The left side g(lam) is nondecreasing and
  piecewise linear with breakpoints at the caps: sorted ascending, g(cap_j) = (sum over i < j of
  weight_i cap_i) + cap_j * (sum over i >= j of weight_i). The first breakpoint with
  g >= needed closes the segment holding lam, where g is linear. Rows that never reach `needed`
  (the box cannot reach the hyperplane) get _UNBOUNDED.
  """
  cap, weight = jax.lax.sort((cap, weight), dimension=1, num_keys=1)
  filled = jnp.cumsum(weight * cap, axis=1)
  below = jnp.pad(filled[:, :-1], ((0, 0), (1, 0)))
  above = jnp.flip(jnp.cumsum(jnp.flip(weight, 1), axis=1), 1)
  reached = below + cap * above
  segment = jnp.sum(reached < needed[:, None], axis=1)
  feasible = segment < cap.shape[1]
  index = jnp.minimum(segment, cap.shape[1] - 1)[:, None]
  below = jnp.take_along_axis(below, index, axis=1)[:, 0]
  above = jnp.take_along_axis(above, index, axis=1)[:, 0]
  level = jnp.where(above > 0, (needed - below) / jnp.where(above > 0, above, 1.0), 0.0)
  return jnp.where(feasible, jnp.maximum(level, 0.0), _UNBOUNDED)


def minimal_step_to_hyperplane(points: jax.Array, w: jax.Array, b: jax.Array,
                               norm: str) -> jax.Array:
  """The smallest step d (in `norm`) with w.(p + d) + b = 0 and p + d in [0, 1], per row.

  points, w: [M, ...] (points in [0, 1]); b: [M]. Returns d with the shape of `points`. Where no
  point of the box lies on the hyperplane, d goes to the box corner closest to it (the point of
  the box where w.z + b is nearest to 0), as the reference does. Coordinates with w_i = 0 never
  move. linf: d_i = -sign(w_i) min(lam, room_i); l2 (the KKT point of the strictly convex
  problem): d_i = -sign(w_i) min(lam |w_i|, room_i), room_i being how far coordinate i can
  move towards the hyperplane inside the box.
  """
  shape = points.shape
  points = points.reshape(shape[0], -1).astype(jnp.float32)
  w = w.reshape(shape[0], -1).astype(jnp.float32)
  value = jnp.sum(w * points, axis=1) + b.astype(jnp.float32)
  # Orient each row so that the step must lower w.z by `needed` >= 0.
  w = jnp.where(value[:, None] < 0, -w, w)
  needed = jnp.abs(value)
  room = jnp.where(w > 0, points, 1.0 - points)
  magnitude = jnp.abs(w)
  if norm == "linf":
    level = _water_level(magnitude, room, needed)
    size = jnp.minimum(level[:, None], room)
  else:
    positive = magnitude > 0
    cap = jnp.where(positive, room / jnp.where(positive, magnitude, 1.0), _UNBOUNDED)
    level = _water_level(magnitude * magnitude, jnp.minimum(cap, _UNBOUNDED), needed)
    size = jnp.minimum(level[:, None] * magnitude, room)
  return (-jnp.sign(w) * size).reshape(shape)


def project_onto_hyperplane_box(points: jax.Array, w: jax.Array, b: jax.Array,
                                norm: str) -> jax.Array:
  """The point of {z : w.z + b = 0} in [0, 1] closest to each row of `points` in `norm`.

  See `minimal_step_to_hyperplane` (the closest box corner where the two do not meet).
  """
  return jnp.clip(points + minimal_step_to_hyperplane(points, w, b, norm), 0.0, 1.0)


def _random_start(key: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
  """The reference's restart point: x + eps/2 times a random direction of unit norm, in [0, 1]."""
  if norm == "linf":
    noise = jax.random.uniform(key, x.shape, jnp.float32, -1.0, 1.0)
  else:
    noise = jax.random.normal(key, x.shape, jnp.float32)
  length = jnp.maximum(norms.perturbation_norm(noise, norm), 1e-12)
  return jnp.clip(x + norms.per_example(0.5 * eps / length, x) * noise, 0.0, 1.0)


def _class_logit(logits: jax.Array, classes: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logits.astype(jnp.float32), classes[:, None], axis=1)[:, 0]


def fab_run(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array,
            targets: jax.Array, start: jax.Array, frozen: jax.Array, eps: jax.Array,
            alpha_max: jax.Array, eta: jax.Array, beta: jax.Array, *, steps: int,
            norm: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One targeted FAB run of `steps` iterations from `start` (float32, shaped like x).

  Returns (closest misclassified point [N, ...] (x where none), its distance to x [N] (inf where
  none), iterations until one within eps was found [N] (`steps` if none)). `frozen` examples do
  not move and find nothing.
  """
  batch = x.shape[0]
  origin = x.reshape(batch, -1)

  def gap_and_grad(current):
    def total(inputs):
      logits = logits_fn(params, inputs)
      gap = _class_logit(logits, targets) - _class_logit(logits, labels)
      return jnp.sum(gap), gap

    (_, gap), grad = jax.value_and_grad(total, has_aux=True)(current.reshape(x.shape))
    return gap, grad.reshape(batch, -1).astype(jnp.float32)

  def cond(state):
    return (state[0] < steps) & jnp.any(~frozen)

  def body(state):
    iteration, current, best, best_norm, first = state
    gap, w = gap_and_grad(current)
    # The linearized boundary gap + w.(z - current) = 0, i.e. w.z + offset = 0.
    offset = gap - jnp.sum(w * current, axis=1)
    step = minimal_step_to_hyperplane(jnp.concatenate([current, origin]),
                                      jnp.concatenate([w, w]),
                                      jnp.concatenate([offset, offset]), norm)
    from_current, from_origin = step[:batch], step[batch:]
    length = jnp.maximum(norms.perturbation_norm(step, norm), _MIN_NORM)
    length_current, length_origin = length[:batch], length[batch:]
    alpha = jnp.clip(length_current / (length_current + length_origin), 0.0, alpha_max)[:, None]
    moved = jnp.clip((current + eta * from_current) * (1.0 - alpha)
                     + (origin + eta * from_origin) * alpha, 0.0, 1.0)

    logits = logits_fn(params, moved.reshape(x.shape))
    adversarial = (jnp.argmax(logits, axis=-1) != labels) & ~frozen
    distance = norms.perturbation_norm(moved - origin, norm)
    closer = adversarial & (distance < best_norm)
    found_before = best_norm <= eps
    best = pick_per_example(closer, moved, best)
    best_norm = jnp.where(closer, distance, best_norm)
    first = jnp.where(~found_before & (best_norm <= eps), iteration + 1, first)
    following = pick_per_example(adversarial, origin + beta * (moved - origin), moved)
    return iteration + 1, pick_per_example(frozen, current, following), best, best_norm, first

  init = (jnp.int32(0), start.reshape(batch, -1).astype(jnp.float32), origin,
          jnp.full((batch,), jnp.inf, jnp.float32), jnp.full((batch,), steps, jnp.int32))
  _, _, best, best_norm, first = jax.lax.while_loop(cond, body, init)
  return best.reshape(x.shape), best_norm, first


@attack_jit(static_argnames=("logits_fn", "steps", "norm", "restarts", "target_classes"))
def _fab_t(logits_fn, params, x, labels, key, eps, alpha_max, eta, beta, *, steps, norm,
           restarts, target_classes):
  x32 = x.astype(jnp.float32)
  clean = logits_fn(params, x32)
  num_targets = min(target_classes, clean.shape[-1] - 1)
  _, ranked = jax.lax.top_k(clean.astype(jnp.float32), num_targets + 1)
  # Clean mistakes count as broken and are never attacked, as in the reference.
  broken = jnp.argmax(clean, axis=-1) != labels

  def attack(index, carry):
    adversarial, broken, steps_used = carry
    targets = jax.lax.dynamic_index_in_dim(ranked, 1 + index // restarts, axis=1,
                                           keepdims=False)
    start = x32
    if restarts > 1:  # Later restarts of each target start at random.
      random = _random_start(jax.random.fold_in(key, index), x32, eps, norm)
      start = jnp.where(index % restarts > 0, random, x32)
    best, best_norm, first = fab_run(logits_fn, params, x32, labels, targets, start, broken, eps,
                                     alpha_max, eta, beta, steps=steps, norm=norm)
    won = ~broken & (best_norm <= eps)
    used = jnp.where(broken, 0, jnp.where(won, first, steps))
    return pick_per_example(won, best, adversarial), broken | won, steps_used + used

  init = (x32, broken, jnp.zeros(x.shape[:1], jnp.int32))
  adversarial, _, steps_used = jax.lax.fori_loop(0, num_targets * restarts, attack, init)
  adversarial = norms.project(adversarial, x32, eps, norm)
  result, _ = score(logits_fn, params, x32, adversarial, labels, steps_used, norm, False)
  return result.replace(adversarial=adversarial.astype(x.dtype))


def _check_overshoot(value: Any) -> None:
  if validation.is_traced(value):
    return
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
      or not np.isfinite(value) or value < 1):
    raise ConfigError(f"eta must be a finite number >= 1, got {value!r}")


def fab_t(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array, *,
          key: jax.Array | None, eps: float | jax.Array, steps: int = 100, norm: str = "linf",
          restarts: int = 1, target_classes: int = 9, alpha_max: float = 0.1,
          eta: float = 1.05, beta: float = 0.9) -> AttackResult:
  """Targeted FAB as AutoAttack's fab-t: the closest misclassified point, if within `eps`.

  For each of the `target_classes` (capped at classes - 1) most likely classes other than the
  true one, `restarts` runs of `steps` iterations attack the points still unbroken (the first
  from x, later ones from a random start drawn from `key`, which only restarts > 1 need).
  Examples whose closest misclassified point found lies beyond their eps (scalar or [N]) come
  back as x. `alpha_max`, `eta` and `beta` are the reference's step bound, overshoot and
  backward step.
  """
  validation.check_attack_inputs(logits_fn, params, x, labels, eps=eps, norm=norm)
  validation.check_positive_int(steps, "steps")
  validation.check_positive_int(restarts, "restarts")
  validation.check_positive_int(target_classes, "target_classes")
  validation.check_unit_interval(alpha_max, "alpha_max")
  validation.check_unit_interval(beta, "beta")
  _check_overshoot(eta)
  validation.check_key(key, required=restarts > 1,
                       reason=" when restarts > 1 (later restarts start at random)")
  return _fab_t(logits_fn, params, jnp.asarray(x), jnp.asarray(labels, jnp.int32),
                prng_key(key), as_budget(eps, np.shape(x)[0]),
                jnp.asarray(alpha_max, jnp.float32), jnp.asarray(eta, jnp.float32),
                jnp.asarray(beta, jnp.float32), steps=int(steps), norm=norm,
                restarts=int(restarts), target_classes=int(target_classes))


# The registry entry (see `adcorda_jax.attacks.registry`); its settings live in section `fab`.


def _read_fab(section: ml_collections.ConfigDict, prefix: str) -> dict[str, Any]:
  eta = config_checks.positive_float(section, "eta", prefix, default=1.05)
  if eta < 1:
    raise ConfigError(f"{prefix}.eta must be >= 1, got {eta!r}")
  return {"steps": config_checks.positive_int(section, "steps", prefix, default=100),
          "restarts": config_checks.positive_int(section, "restarts", prefix, default=1),
          "target_classes": config_checks.positive_int(section, "target_classes", prefix,
                                                       default=9),
          "alpha_max": config_checks.unit_fraction(section, "alpha_max", prefix, default=0.1),
          "eta": eta,
          "beta": config_checks.unit_fraction(section, "beta", prefix, default=0.9)}


def _run_fab(spec: AttackSpec, logits_fn: LogitsFn, params: Any, x: jax.Array,
             labels: jax.Array, key: jax.Array, eps: jax.Array) -> AttackResult:
  return _fab_t(logits_fn, params, x, labels, key, eps, jnp.float32(spec.alpha_max),
                jnp.float32(spec.eta), jnp.float32(spec.beta), steps=spec.steps, norm=spec.norm,
                restarts=spec.restarts, target_classes=spec.target_classes)


def _describe_fab(spec: AttackSpec) -> str:
  return (describe_steps(spec) + f", {spec.target_classes} target classes"
          + describe_restarts(spec))


register(AttackMethod(name="fab_t", section="fab", read=_read_fab, run=_run_fab,
                      describe=_describe_fab))

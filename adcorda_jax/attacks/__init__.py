"""Adversarial attacks as pure, jit-compiled functions of a model-agnostic `logits_fn`.

    logits_fn, params = attack_model(model, variables)  # or any `logits_fn(params, x)`
    result = pgd(logits_fn, params, images, labels, key=key, eps=8 / 255,
                 step_size=2 / 255, steps=10)
    result.adversarial, result.success, result.steps_used, result.perturbation_norm
    # AutoAttack over a whole set, each attack on the points still robust:
    split = autoattack(logits_fn, params, images, labels, key=key, eps=8 / 255)
    split.robust_accuracy, split.details["cascade"]

`attack_model` gives the library's fastest eval-mode model function for the backend (see
`adcorda_jax.models.frozen`); `AttackSpec` + `attack_split` run an attack over a whole split.
`params` (any pytree) is a traced argument, so one compilation serves every checkpoint; reuse the
same `logits_fn` object across calls, since it is a static argument of the compiled attack.
Images are float NHWC in [0, 1]; `eps` and `step_size` are scalars or per-example [N] arrays.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from adcorda_jax.attacks import validation
from adcorda_jax.attacks.apgd import apgd_ce, apgd_dlr, apgd_t
from adcorda_jax.attacks.compile import attack_jit
from adcorda_jax.attacks.correction import correct
from adcorda_jax.attacks.driver import SplitAttackResult, attack_split
from adcorda_jax.attacks.ensemble import autoattack, autoattack_spec
from adcorda_jax.attacks.fab import fab_t
from adcorda_jax.attacks.losses import AttackResult, LogitsFn
from adcorda_jax.attacks.model_fn import attack_model
from adcorda_jax.attacks.norms import NORMS
from adcorda_jax.attacks.pgd import fgsm, pgd
from adcorda_jax.attacks.specs import AttackSpec
from adcorda_jax.attacks.square_attack import square

__all__ = ["NORMS", "AttackResult", "AttackSpec", "SplitAttackResult", "apgd_ce", "apgd_dlr",
           "apgd_t", "attack_model", "attack_split", "autoattack", "autoattack_spec", "correct",
           "fab_t", "fgsm", "pgd", "robust_accuracy_curve", "square"]


def _is_traced_argument(value: Any) -> bool:
  """Floats and arrays are passed traced (one compile for all values); the rest is static."""
  if isinstance(value, (bool, np.bool_)):
    return False
  return isinstance(value, (float, np.floating, np.ndarray, jax.Array))


@attack_jit(static_argnums=(0, 1, 2))
def _curve(attack_fn, logits_fn, static_kwargs, params, x, labels, eps_grid, traced_kwargs):
  def failure_rate(eps):
    result = attack_fn(logits_fn, params, x, labels, eps=eps, **dict(static_kwargs),
                       **traced_kwargs)
    return jnp.mean((~result.success).astype(jnp.float32))

  return jax.vmap(failure_rate)(eps_grid)


def robust_accuracy_curve(attack_fn: Callable[..., AttackResult], logits_fn: LogitsFn,
                          params: Any, x: jax.Array, labels: jax.Array, eps_grid: Any,
                          **kwargs: Any) -> jax.Array:
  """Robust accuracy (fraction of examples the attack fails on) at each eps of `eps_grid`.

  The whole grid runs as ONE compiled program (`jax.vmap` over eps), equal to separate runs of
  `attack_fn(logits_fn, params, x, labels, eps=e, **kwargs)`. Use an untargeted attack with the
  true `labels`. Returns float32 [len(eps_grid)].
  """
  grid = validation.check_eps_grid(eps_grid)
  validation.check_images(x)
  batch_size = np.shape(x)[0]
  validation.check_labels(labels, batch_size, validation.num_classes(logits_fn, params, x))
  traced = {k: v for k, v in kwargs.items() if _is_traced_argument(v)}
  static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in traced))
  return _curve(attack_fn, logits_fn, static, params, jnp.asarray(x),
                jnp.asarray(labels, jnp.int32), jnp.asarray(grid), traced)

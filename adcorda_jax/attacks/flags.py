"""AutoAttack's sanity flags: signs that a robustness evaluation may be unreliable.

The reference (Croce & Hein, `autoattack/checks.py`) warns when
  * the model's outputs look like probabilities (in [0, 1], rows summing to 1): attacks on
    softmax outputs see vanishing gradients, so logits should be attacked;
  * two evaluations of the same inputs differ: a randomized model needs an EOT evaluation;
  * points have an all-zero input gradient: gradient attacks cannot move them (masking);
  * Square, which uses no gradient, breaks points the gradient attacks could not (by more than
    0.2% of the points): another sign of gradient masking.
`model_flags` computes the first three on a batch of inputs; `square_gain` the last from the
per-point outcomes. `report_flags` adds the one-line warnings and logs them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from adcorda_jax.attacks.losses import LogitsFn, objective_from_logits

PROBABILITY_TOLERANCE = 1e-5   # As the reference's check_range_output.
RANDOMIZED_TOLERANCE = 1e-4    # Max l2 difference of l2-normalized outputs (check_randomized).
SQUARE_TOLERANCE = 0.002       # Square may break 0.2% more points before it is flagged.
FLAG_EXAMPLES = 256            # Points the model checks run on.


def _outputs_and_gradient(logits_fn: LogitsFn, params: Any, x: jax.Array,
                          labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  def total(inputs):
    logits = logits_fn(params, inputs)
    return jnp.sum(objective_from_logits(logits, labels, False)), logits

  (_, logits), grad = jax.value_and_grad(total, has_aux=True)(x)
  return logits, jnp.sum(jnp.abs(grad.reshape(len(x), -1)), axis=1)


# Module-level programs, one compile per logits_fn (a static argument), reused by every evaluation.
_outputs_and_gradient_jit = jax.jit(_outputs_and_gradient, static_argnums=0)
_logits_jit = jax.jit(lambda logits_fn, params, x: logits_fn(params, x), static_argnums=0)


def model_flags(logits_fn: LogitsFn, params: Any, images: np.ndarray, labels: np.ndarray,
                max_examples: int = FLAG_EXAMPLES) -> dict[str, Any]:
  """Probability-like outputs, randomness and zero gradients on the first `max_examples`.

  The gradient is that of the cross-entropy of the true label, through `logits_fn` as the
  attacks see it (for a quantized network: its STE or BPDA path).
  """
  if len(images) == 0:  # Nothing to check (an empty split).
    return {"checked_examples": 0, "probability_outputs": False, "randomized": False,
            "output_difference": 0.0, "zero_gradient_fraction": 0.0}
  x = jnp.asarray(images[:max_examples], jnp.float32)
  y = jnp.asarray(labels[:max_examples], jnp.int32)
  first, gradient_size = _outputs_and_gradient_jit(logits_fn, params, x, y)
  # A second evaluation in a separate program, as a randomized model would answer differently.
  second = _logits_jit(logits_fn, params, x)
  first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)

  def normalized(outputs):
    return outputs / (np.linalg.norm(outputs, axis=1, keepdims=True) + 1e-10)

  difference = float(np.max(np.linalg.norm(normalized(first) - normalized(second), axis=1),
                            initial=0.0))
  looks_like_probabilities = bool(
      first.max() < 1 + PROBABILITY_TOLERANCE and first.min() > -PROBABILITY_TOLERANCE
      and np.all(np.abs(first.sum(axis=1) - 1) < PROBABILITY_TOLERANCE))
  zero = np.asarray(gradient_size) == 0
  return {"checked_examples": int(len(x)),
          "probability_outputs": looks_like_probabilities,
          "randomized": bool(difference > RANDOMIZED_TOLERANCE
                             or np.any(first.argmax(1) != second.argmax(1))),
          "output_difference": difference,
          "zero_gradient_fraction": float(np.mean(zero)) if len(zero) else 0.0}


def square_gain(square_correct: np.ndarray, gradient_correct: np.ndarray) -> float:
  """The fraction of points Square broke that every gradient attack left correct."""
  square_correct, gradient_correct = np.asarray(square_correct), np.asarray(gradient_correct)
  return float(np.mean(gradient_correct & ~square_correct)) if len(square_correct) else 0.0


def cascade_square_gain(cascade: list[dict[str, Any]], total: int) -> float | None:
  """Square's share in an autoattack cascade that ran gradient attacks before it, else None."""
  names = [record["attack"] for record in cascade]
  if "square" not in names or names.index("square") == 0 or total == 0:
    return None
  return cascade[names.index("square")]["broken"] / total


def split_square_gains(outcomes: list[tuple[str, float, Any]]) -> dict[str, float]:
  """eps key -> Square's gain over the gradient attacks, from (attack name, eps, result) runs.

  An autoattack run gives its cascade's Square share; a separate `square` run is compared
  with the per-point worst case of the other attacks at the same eps. Only budgets where
  Square ran beside gradient attacks appear.
  """
  from adcorda_jax.attacks.eps import eps_key

  gains: dict[str, float] = {}
  for eps in dict.fromkeys(e for _, e, _ in outcomes):
    here = [(name, result) for name, e, result in outcomes if e == eps]
    candidates = []
    for name, result in here:
      if name == "autoattack" and result.details:
        gain = cascade_square_gain(result.details["cascade"], result.num_examples)
        candidates += [] if gain is None else [gain]
    square = [result for name, result in here if name == "square"]
    others = [result.final_correct for name, result in here
              if name not in ("square", "autoattack")]
    if square and others:
      candidates.append(square_gain(square[0].final_correct, np.logical_and.reduce(others)))
    if candidates:
      gains[eps_key(eps)] = max(candidates)
  return gains


def report_flags(flags: dict[str, Any], square_gains: dict[str, float], context: str
                 ) -> dict[str, Any]:
  """`flags` plus `square_gain` (eps key -> gain) and one-line `warnings`, each also logged."""
  warnings = []
  if flags["probability_outputs"]:
    warnings.append("the outputs look like probabilities (in [0, 1], summing to 1): attack "
                    "the logits, or gradients vanish")
  if flags["randomized"]:
    warnings.append(f"two evaluations of the same inputs differ (by {flags['output_difference']:.2g}):"
                    " a randomized model needs an expectation-over-transformation evaluation")
  if flags["zero_gradient_fraction"] > 0:
    warnings.append(f"{flags['zero_gradient_fraction']:.1%} of the checked points have an "
                    "all-zero input gradient: gradient attacks cannot move them")
  for eps, gain in square_gains.items():
    if gain > SQUARE_TOLERANCE:
      warnings.append(f"at eps {eps} Square (no gradients) broke {gain:.2%} of the points the "
                      "gradient attacks could not: a sign of gradient masking")
  for warning in warnings:
    logging.warning("Robustness check (%s): %s.", context, warning)
  return {**flags, "square_gain": dict(square_gains), "warnings": warnings}

"""Optimizers and learning-rate schedules built from `config.train`.

Everything here is optax: SGD with (Nesterov) momentum or AdamW, decoupled weight decay applied to
conv/dense kernels only (not to biases or BatchNorm), and warmup followed by cosine, step or
constant decay.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from adcorda_jax import config_checks
from adcorda_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


def make_schedule(train_config: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup over `warmup_epochs`, then the configured decay until `total_steps`."""
  base_lr = config_checks.positive_float(train_config, "learning_rate", "train")
  kind = config_checks.one_of(train_config, "schedule", "train", SCHEDULES, default="cosine")
  warmup_epochs = config_checks.positive_float(
      train_config, "warmup_epochs", "train", default=0.0, allow_zero=True)
  warmup_steps = min(int(round(warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup_steps, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(base_lr, decay_steps)
  elif kind == "step":
    boundaries = tuple(train_config.get("step_boundaries", (0.5, 0.75)))
    if any(not 0 < b < 1 for b in boundaries):
      raise config_checks.ConfigError(
          f"train.step_boundaries must be fractions of training in (0, 1), got {boundaries!r}")
    factor = config_checks.positive_float(train_config, "step_decay", "train", default=0.1)
    decay = optax.piecewise_constant_schedule(
        base_lr, {int(b * decay_steps): factor for b in boundaries})
  else:
    decay = optax.constant_schedule(base_lr)
  if warmup_steps == 0:
    return decay
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def _kernel_mask(params: Any) -> Any:
  """True for conv/dense kernels (rank >= 2), the weights that weight decay should shrink."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer named by `train.optimizer`, with decoupled weight decay on kernels."""
  kind = config_checks.one_of(train_config, "optimizer", "train", OPTIMIZERS, default="sgd")
  weight_decay = config_checks.positive_float(
      train_config, "weight_decay", "train", default=0.0, allow_zero=True)
  if kind == "adamw":
    return optax.adamw(schedule, weight_decay=weight_decay, mask=_kernel_mask)
  momentum = config_checks.fraction(train_config, "momentum", "train", default=0.9)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=_kernel_mask),
      optax.sgd(schedule, momentum=momentum or None,
                nesterov=bool(train_config.get("nesterov", False)) and momentum > 0),
  )


def check_optimizer_fields(section: ml_collections.ConfigDict, prefix: str) -> None:
  """Checks the optimizer/schedule fields of a fine-tuning section (`adapt`, `distill`, ...).

  `make_optimizer`/`make_schedule` name `train.*` in their errors; a section that reuses them
  checks its own fields first, so errors name `<prefix>.<key>`.
  """
  config_checks.positive_float(section, "learning_rate", prefix)
  config_checks.one_of(section, "optimizer", prefix, OPTIMIZERS, default="sgd")
  config_checks.one_of(section, "schedule", prefix, SCHEDULES, default="cosine")
  config_checks.positive_float(section, "warmup_epochs", prefix, default=0.0, allow_zero=True)
  config_checks.positive_float(section, "weight_decay", prefix, default=0.0, allow_zero=True)
  config_checks.fraction(section, "momentum", prefix, default=0.9)
  config_checks.positive_float(section, "step_decay", prefix, default=0.1)
  boundaries = section.get("step_boundaries", (0.5, 0.75))
  if not isinstance(boundaries, (tuple, list)) or any(
      isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1
      for b in boundaries):
    raise ConfigError(f"{prefix}.step_boundaries must be fractions of training in (0, 1), "
                      f"got {boundaries!r}")

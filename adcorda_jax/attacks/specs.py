"""Attacks as validated, hashable specs built from a config section.

An `AttackSpec` is checked once on the host (one-line `ConfigError`s naming the config keys) and
then calls the jitted attack internals directly, so running it batch after batch never re-validates
or pulls device arrays back to the host. Being a frozen dataclass it is hashable: it can be a static
argument of `jax.jit`, and its fields are the fingerprint a resumable run is checked against.

PGD and correction step size: `step_size` (absolute) when > 0, otherwise
`step_size_factor * eps / steps` (Madry et al.'s 2.5 by default: enough to cross the ball and
back). The relative rule scales with eps, so one spec serves a whole eps grid, and eps = 0 gives
step 0 and adversarial == x (robust accuracy == clean accuracy).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from adcorda_jax import config_checks
from adcorda_jax.attacks import norms
from adcorda_jax.attacks.apgd import _apgd_ce
from adcorda_jax.attacks.correction import _correct
from adcorda_jax.attacks.losses import AttackResult, LogitsFn
from adcorda_jax.attacks.pgd import _fgsm, _pgd, as_budget
from adcorda_jax.errors import ConfigError

ATTACK_NAMES = ("fgsm", "pgd", "apgd_ce", "correct")
# Untargeted attacks, whose success lowers accuracy (robustness evaluation).
UNTARGETED = ("fgsm", "pgd", "apgd_ce")
# The config sub-section holding each attack's settings (`<prefix>.pgd.steps`, ...).
SECTIONS = {"fgsm": "fgsm", "pgd": "pgd", "apgd_ce": "apgd", "correct": "correct"}


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack and its settings; `run` attacks a batch at a given eps.

  Attributes:
    name: fgsm, pgd, apgd_ce (untargeted) or correct (AdCorDA: descend toward the true label).
    norm: linf or l2, the perturbation ball.
    steps: gradient steps per restart (fgsm: 1).
    step_size: pgd/correct absolute step; 0 means `step_size_factor * eps / steps`.
    step_size_factor: pgd/correct relative step rule (used when step_size is 0).
    restarts: pgd/apgd_ce runs from fresh random starts for still-unbroken examples.
    random_start: pgd/correct start uniformly in the ball (apgd_ce always does, fgsm never).
    rho, momentum: apgd_ce checkpoint threshold and momentum (Croce & Hein's 0.75, 0.75).
    early_stop: an example stops moving once successful (same accuracy, less work).
  """
  name: str
  norm: str = "linf"
  steps: int = 10
  step_size: float = 0.0
  step_size_factor: float = 2.5
  restarts: int = 1
  random_start: bool = True
  rho: float = 0.75
  momentum: float = 0.75
  early_stop: bool = True

  def __post_init__(self):
    check_spec_fields(self, "attack")

  @property
  def targets_true_label(self) -> bool:
    """True for correction (success = now right), False for attacks (success = now wrong)."""
    return self.name == "correct"

  def describe(self) -> str:
    """A short human label, e.g. `pgd linf, 10 steps (2.5*eps/10), 1 restart`."""
    if self.name == "fgsm":
      return f"fgsm {self.norm}"
    text = f"{self.name} {self.norm}, {self.steps} steps"
    if self.name in ("pgd", "correct"):
      rule = (f"{self.step_size:g}" if self.step_size > 0
              else f"{self.step_size_factor:g}*eps/{self.steps}")
      text += f" of {rule}" + (", random start" if self.random_start else "")
    if self.name in ("pgd", "apgd_ce"):
      text += f", {self.restarts} restart" + ("s" if self.restarts > 1 else "")
    return text

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def step_size_for(self, eps: jax.Array) -> jax.Array:
    """The pgd/correct step size for budget `eps` (see the module docstring)."""
    if self.step_size > 0:
      return jnp.full_like(eps, self.step_size)
    return eps * (self.step_size_factor / self.steps)

  def run(self, logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array,
          key: jax.Array, eps: float | jax.Array) -> AttackResult:
    """Attacks the batch `x` (float [N, ...] in [0, 1]) with int32 true `labels` at `eps`.

    No argument checks here (the spec was validated when built; the caller checks data once),
    so this is cheap to call per batch, also under `jax.jit` with every array traced.
    """
    eps = as_budget(eps, x.shape[0])
    if self.name == "fgsm":
      return _fgsm(logits_fn, params, x, labels, eps, norm=self.norm, targeted=False)
    if self.name == "apgd_ce":
      return _apgd_ce(logits_fn, params, x, labels, key, eps, jnp.float32(self.rho),
                      jnp.float32(self.momentum), steps=self.steps, norm=self.norm,
                      restarts=self.restarts, early_stop=self.early_stop)
    step_size = self.step_size_for(eps)
    if self.name == "correct":
      return _correct(logits_fn, params, x, labels, key, eps, step_size, steps=self.steps,
                      norm=self.norm, random_start=self.random_start)
    return _pgd(logits_fn, params, x, labels, key, eps, step_size, steps=self.steps,
                norm=self.norm, targeted=False, random_start=self.random_start,
                restarts=self.restarts, early_stop=self.early_stop)


def _fail(key: str, requirement: str, value: Any) -> None:
  raise ConfigError(f"{key} must be {requirement}, got {value!r}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def check_spec_fields(spec: AttackSpec, prefix: str) -> None:
  """Raises a one-line ConfigError naming `<prefix>.<field>` for the first invalid field."""
  if spec.name not in ATTACK_NAMES:
    raise ConfigError(f"unknown attack {spec.name!r} ({prefix}.name); valid names: "
                      f"{', '.join(ATTACK_NAMES)}")
  if spec.norm not in norms.NORMS:
    raise ConfigError(f"{prefix}.norm={spec.norm!r} is not valid; choose one of: "
                      f"{', '.join(norms.NORMS)}")
  for field in ("steps", "restarts"):
    value = getattr(spec, field)
    if not _is_int(value) or value <= 0:
      _fail(f"{prefix}.{field}", "an integer > 0", value)
  if not _is_number(spec.step_size) or spec.step_size < 0:
    _fail(f"{prefix}.step_size", "a finite number >= 0 (0 = relative to eps)", spec.step_size)
  if not _is_number(spec.step_size_factor) or spec.step_size_factor <= 0:
    _fail(f"{prefix}.step_size_factor", "a finite number > 0", spec.step_size_factor)
  for field in ("rho", "momentum"):
    value = getattr(spec, field)
    if not _is_number(value) or not 0 < value <= 1:
      _fail(f"{prefix}.{field}", "a number in (0, 1]", value)
  for field in ("random_start", "early_stop"):
    if not isinstance(getattr(spec, field), bool):
      _fail(f"{prefix}.{field}", "True or False", getattr(spec, field))


def spec_from_config(name: str, norm: str, section: ml_collections.ConfigDict | None,
                     prefix: str) -> AttackSpec:
  """Builds the `name` attack from its config `section` (keys named `<prefix>.<key>`).

  `norm` is checked by the caller, which knows its config key.

  Only the keys the attack uses are read; the others keep their defaults, so the spec (and the
  fingerprint of a run) does not change when an unrelated key does. fgsm needs no section.
  """
  section = section if section is not None else ml_collections.ConfigDict()
  fields: dict[str, Any] = {"name": name, "norm": norm}
  if name == "fgsm":
    fields.update(steps=1, random_start=False)
  else:
    default_steps = 100 if name == "apgd_ce" else 10
    fields["steps"] = config_checks.positive_int(section, "steps", prefix, default=default_steps)
  if name in ("pgd", "correct"):
    fields["step_size"] = config_checks.positive_float(section, "step_size", prefix,
                                                       default=0.0, allow_zero=True)
    fields["step_size_factor"] = config_checks.positive_float(section, "step_size_factor",
                                                              prefix, default=2.5)
    fields["random_start"] = _flag(section, "random_start", prefix, default=name == "pgd")
  if name in ("pgd", "apgd_ce"):
    fields["restarts"] = config_checks.positive_int(section, "restarts", prefix, default=1)
  if name == "apgd_ce":
    fields["rho"] = config_checks.fraction(section, "rho", prefix, default=0.75, allow_one=True)
    fields["momentum"] = config_checks.fraction(section, "momentum", prefix, default=0.75,
                                                allow_one=True)
  if name != "fgsm":
    fields["early_stop"] = _flag(section, "early_stop", prefix, default=True)
  return AttackSpec(**fields)


def _flag(section: ml_collections.ConfigDict, key: str, prefix: str, default: bool) -> bool:
  value = section.get(key, default)
  if not isinstance(value, bool):
    _fail(f"{prefix}.{key}", "True or False", value)
  return value


def parse_attack_names(value: Any, config_key: str,
                       allowed: tuple[str, ...] = ATTACK_NAMES) -> tuple[str, ...]:
  """Splits a comma-separated string such as "pgd,apgd_ce" into checked, unique attack names."""
  if not isinstance(value, str):
    raise ConfigError(f"{config_key} must be a comma-separated string such as "
                      f"{','.join(allowed[:2])!r}, got {value!r}")
  names = tuple(part.strip() for part in value.split(",") if part.strip())
  if not names:
    raise ConfigError(f"{config_key} must name at least one attack; valid names: "
                      f"{', '.join(allowed)}")
  for name in names:
    if name not in allowed:
      raise ConfigError(f"unknown attack {name!r} ({config_key}); valid names: "
                        f"{', '.join(allowed)}")
  if len(set(names)) != len(names):
    raise ConfigError(f"{config_key}={value!r} names an attack twice")
  return names


def check_eps(value: Any, config_key: str) -> float:
  """A single budget: a finite number >= 0."""
  if not _is_number(value) or value < 0:
    _fail(config_key, "a finite number >= 0", value)
  return float(value)


def check_eps_grid(value: Any, config_key: str) -> tuple[float, ...]:
  """A number or non-empty sequence of distinct finite budgets >= 0, as floats."""
  values = (value,) if _is_number(value) or isinstance(value, bool) else value
  if not isinstance(values, (tuple, list)) or not values:
    raise ConfigError(f"{config_key} must be a non-empty tuple of numbers >= 0, got {value!r}")
  grid = tuple(check_eps(v, config_key) for v in values)
  if len(set(grid)) != len(grid):
    raise ConfigError(f"{config_key} lists the same eps twice: {value!r}")
  return grid

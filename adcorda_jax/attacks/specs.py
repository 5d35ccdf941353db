"""Attacks as validated, hashable specs built from a config section.

An `AttackSpec` is checked once on the host (one-line `ConfigError`s naming the config keys) and
then calls the jitted attack internals directly, so running it batch after batch never re-validates
or pulls device arrays back to the host. Being a frozen dataclass it is hashable: it can be a static
argument of `jax.jit`, and its fields are the fingerprint a resumable run is checked against.

PGD and correction step size: `step_size` (absolute) when > 0, otherwise
`step_size_factor * eps / steps` (Madry et al.'s 2.5 by default: enough to cross the ball and
back). The relative rule scales with eps, so one spec serves a whole eps grid, and eps = 0 gives
step 0 and adversarial == x (robust accuracy == clean accuracy).

Which attacks exist, and how each reads, runs and describes a spec, is the `ATTACKS` registry
(`adcorda_jax.attacks.registry`, where adding an attack is shown); the modules that register the
built-in ones are imported here, so the registry is full wherever an `AttackSpec` is built.
`ATTACK_NAMES`, `UNTARGETED` and `SECTIONS` are read from it on access.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from adcorda_jax import config_checks
# Importing these registers the built-in attacks, in the order errors list them: fgsm and pgd
# (pgd.py, which the others import first), apgd_ce, apgd_dlr, apgd_t, correct, fab_t, square,
# autoattack.
from adcorda_jax.attacks import pgd, apgd, correction, fab, square_attack, ensemble  # noqa: F401
from adcorda_jax.attacks import norms
from adcorda_jax.attacks.losses import AttackResult, LogitsFn
from adcorda_jax.attacks.pgd import as_budget
from adcorda_jax.attacks.registry import (ATTACKS, AttackMethod, attack_names, sections,
                                          untargeted_names)
from adcorda_jax.errors import ConfigError

# Names derived from ATTACKS when read, so they include attacks registered after this import:
# every attack, in registration order; the untargeted ones, whose success lowers accuracy
# (robustness evaluation); and the config sub-section of each (`<prefix>.pgd.steps`, ...).
_DERIVED = {"ATTACK_NAMES": attack_names, "UNTARGETED": untargeted_names, "SECTIONS": sections}


def __getattr__(name: str) -> Any:
  if name in _DERIVED:
    return _DERIVED[name]()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack and its settings; `run` attacks a batch at a given eps.

  Attributes:
    name: a registered attack: fgsm, pgd, apgd_ce (untargeted) or correct (AdCorDA: descend
      toward the true label).
    norm: linf or l2, the perturbation ball.
    steps: gradient steps per restart (fgsm: 1).
    step_size: pgd/correct absolute step; 0 means `step_size_factor * eps / steps`.
    step_size_factor: pgd/correct relative step rule (used when step_size is 0).
    restarts: pgd/apgd_ce runs from fresh random starts for still-unbroken examples.
    random_start: pgd/correct start uniformly in the ball (apgd_ce always does, fgsm never).
    rho, momentum: APGD checkpoint threshold and momentum (Croce & Hein's 0.75, 0.75).
    early_stop: an example stops moving once successful (same accuracy, less work).
    target_classes: apgd_t/fab_t attack the top-k classes other than the true one, one run each
      (AutoAttack's 9; capped at classes - 1).
    p_init: square's initial fraction of pixels changed per query (AutoAttack's 0.8).
    alpha_max, eta, beta: fab_t's extrapolation bound, overshoot and backward step (0.1, 1.05,
      0.9 as in the reference).
    components: autoattack's attacks, in the order they run, each on the survivors of the
      previous ones.
    For square, `steps` counts queries (forward passes) instead of gradient steps.
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
  target_classes: int = 9
  p_init: float = 0.8
  alpha_max: float = 0.1
  eta: float = 1.05
  beta: float = 0.9
  components: tuple["AttackSpec", ...] = ()

  def __post_init__(self):
    check_spec_fields(self, "attack")

  @property
  def method(self) -> AttackMethod:
    """The registered attack this spec runs."""
    return ATTACKS.get(self.name)

  @property
  def targets_true_label(self) -> bool:
    """True for correction (success = now right), False for attacks (success = now wrong)."""
    return self.method.targets_true_label

  def describe(self) -> str:
    """A short human label, e.g. `pgd linf, 10 steps of 2.5*eps/10, random start, 1 restart`."""
    return self.method.describe(self)

  def as_dict(self) -> dict[str, Any]:
    """The fields as JSON-ready data: the fingerprint of saved attack runs.

    Fields added with AutoAttack appear only when they differ from their defaults, so runs saved
    before they existed (pgd, apgd_ce, correct) keep their fingerprints and still resume.
    """
    record = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name in _OMITTED_AT_DEFAULT and value == field.default:
        continue
      record[field.name] = ([c.as_dict() for c in value] if field.name == "components"
                            else value)
    return record

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
    return self.method.run(self, logits_fn, params, x, labels, key, as_budget(eps, x.shape[0]))


# Fields that joined AttackSpec after runs were first saved (see `AttackSpec.as_dict`).
_OMITTED_AT_DEFAULT = frozenset(
    {"target_classes", "p_init", "alpha_max", "eta", "beta", "components"})


def _fail(key: str, requirement: str, value: Any) -> None:
  raise ConfigError(f"{key} must be {requirement}, got {value!r}")


def _unknown_attack(name: str, config_key: str, allowed: tuple[str, ...]) -> ConfigError:
  return ConfigError(f"unknown attack {name!r} ({config_key}); valid names: "
                     f"{', '.join(allowed)}")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def check_spec_fields(spec: AttackSpec, prefix: str) -> None:
  """Raises a one-line ConfigError naming `<prefix>.<field>` for the first invalid field."""
  if spec.name not in ATTACKS:
    raise _unknown_attack(spec.name, f"{prefix}.name", attack_names())
  if spec.norm not in norms.NORMS:
    raise ConfigError(f"{prefix}.norm={spec.norm!r} is not valid; choose one of: "
                      f"{', '.join(norms.NORMS)}")
  for field in ("steps", "restarts", "target_classes"):
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
  for field in ("p_init", "alpha_max", "beta"):
    value = getattr(spec, field)
    if not _is_number(value) or not 0 < value <= 1:
      _fail(f"{prefix}.{field}", "a number in (0, 1]", value)
  if not _is_number(spec.eta) or spec.eta < 1:
    _fail(f"{prefix}.eta", "a finite number >= 1", spec.eta)
  if not isinstance(spec.components, tuple) or not all(
      isinstance(c, AttackSpec) for c in spec.components):
    _fail(f"{prefix}.components", "a tuple of AttackSpecs", spec.components)
  for component in spec.components:
    if component.norm != spec.norm or component.components or component.targets_true_label:
      _fail(f"{prefix}.components", f"untargeted {spec.norm} attacks (no ensembles)",
            component.name)


def spec_from_config(name: str, norm: str, section: ml_collections.ConfigDict | None,
                     prefix: str) -> AttackSpec:
  """Builds the `name` attack from its config `section` (keys named `<prefix>.<key>`).

  `norm` is checked by the caller, which knows its config key.

  Only the keys the attack uses are read (its registered `read`); the others keep their
  defaults, so the spec (and the fingerprint of a run) does not change when an unrelated key
  does. fgsm needs no section.
  """
  if name not in ATTACKS:
    raise _unknown_attack(name, "attack.name", attack_names())
  section = section if section is not None else ml_collections.ConfigDict()
  fields = ATTACKS.get(name).read(section, prefix)
  # An ensemble's components attack in its norm.
  fields["components"] = tuple(dataclasses.replace(c, norm=norm)
                               for c in fields.get("components", ()))
  return AttackSpec(name=name, norm=norm, **fields)


def attacks_from_config(section: ml_collections.ConfigDict, prefix: str,
                        default: str) -> tuple[AttackSpec, ...]:
  """The untargeted attacks a `robustness`/`evaluate`-style section names, as checked specs.

  Reads `<prefix>.norm` (default linf), the comma-separated `<prefix>.attacks` (default
  `default`, untargeted attacks only) and each attack's settings from its sub-section, with
  one-line errors naming `<prefix>.attacks`, `<prefix>.<section>.<key>`, ...
  """
  norm = config_checks.one_of(section, "norm", prefix, norms.NORMS, default="linf")
  names = parse_attack_names(section.get("attacks", default), f"{prefix}.attacks",
                             untargeted_names())
  specs = []
  for name in names:
    sub_section = ATTACKS.get(name).section
    specs.append(spec_from_config(name, norm, section.get(sub_section),
                                  f"{prefix}.{sub_section}"))
  return tuple(specs)


def parse_attack_names(value: Any, config_key: str,
                       allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
  """Splits a comma-separated string such as "pgd,apgd_ce" into checked, unique attack names.

  `allowed` defaults to every registered attack.
  """
  allowed = attack_names() if allowed is None else allowed
  if not isinstance(value, str):
    raise ConfigError(f"{config_key} must be a comma-separated string such as "
                      f"{','.join(allowed[:2])!r}, got {value!r}")
  names = tuple(part.strip() for part in value.split(",") if part.strip())
  if not names:
    raise ConfigError(f"{config_key} must name at least one attack; valid names: "
                      f"{', '.join(allowed)}")
  for name in names:
    if name not in allowed:
      raise _unknown_attack(name, config_key, allowed)
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

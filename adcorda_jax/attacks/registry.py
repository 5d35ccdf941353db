"""The attack registry: each attack family is one `AttackMethod`, registered by its own module.

An `AttackSpec` only names its attack. What depends on which attack it is (its config section,
the keys it reads and their defaults, how it runs, its label, whether success means "now wrong"
or "now right") comes from the `AttackMethod` registered under that name, so nothing else
branches on attack names. `pgd.py` registers fgsm and pgd, `apgd.py` apgd_ce, `correction.py`
correct; `specs.py` imports those modules, so the registry is full wherever `AttackSpec` is used.

Adding an attack (say a new `noise` attack) is one module and one registration, plus the import
that loads it (square_attack.py is a real example):

    # adcorda_jax/attacks/noise.py, below the jitted `_noise`
    def _read(section: ml_collections.ConfigDict, prefix: str) -> dict[str, Any]:
      return {"steps": config_checks.positive_int(section, "steps", prefix, default=100),
              "early_stop": read_flag(section, "early_stop", prefix, default=True)}

    def _run(spec, logits_fn, params, x, labels, key, eps) -> AttackResult:
      return _noise(logits_fn, params, x, labels, key, eps, steps=spec.steps, norm=spec.norm,
                    early_stop=spec.early_stop)

    register(AttackMethod(name="noise", section="noise", read=_read, run=_run,
                          describe=lambda spec: f"noise {spec.norm}, {spec.steps} draws"))

    # adcorda_jax/attacks/specs.py: one more name in the import of the registering modules
    from adcorda_jax.attacks import apgd, correction, ..., noise  # noqa: F401

It is then valid in `robustness.attacks="pgd,noise"` and `evaluate.attacks`, reads
`robustness.noise.steps`, runs through `AttackSpec.run` and the split driver, and is labelled in
reports by `describe`. An attack's settings are `AttackSpec` fields: `read` fills the ones it uses
and leaves the others at their defaults, so an unrelated key never changes a run's fingerprint.
A setting no field holds yet means a new `AttackSpec` field; list it in `specs._OMITTED_AT_DEFAULT`
so that `AttackSpec.as_dict()`, the fingerprint of saved runs, leaves it out at its default and
runs saved before it existed still resume (as for AutoAttack's target_classes, p_init, ...).
An attack that must drive a whole split itself (autoattack re-batches each component's
survivors) registers `run_split` as well.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import jax
import ml_collections

from adcorda_jax.attacks.losses import AttackResult, LogitsFn
from adcorda_jax.errors import ConfigError
from adcorda_jax.registry import Registry

if TYPE_CHECKING:
  from adcorda_jax.attacks.specs import AttackSpec

# read(section, prefix) -> the AttackSpec fields this attack sets, checked with config keys
# named `<prefix>.<key>`.
Reader = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]
# run(spec, logits_fn, params, x, labels, key, eps) -> AttackResult, eps a float32 [N] budget.
Runner = Callable[["AttackSpec", LogitsFn, Any, jax.Array, jax.Array, jax.Array, jax.Array],
                  AttackResult]


@dataclasses.dataclass(frozen=True)
class AttackMethod:
  """One attack family: how it reads its settings, runs and describes an `AttackSpec`.

  Attributes:
    name: the `AttackSpec.name`, also the name listed in `<prefix>.attacks`.
    section: the config sub-section holding its settings (`<prefix>.<section>.steps`, ...).
    read: (section, prefix) -> the AttackSpec fields it uses, each checked with a one-line
      ConfigError naming `<prefix>.<key>`; `section` is empty when the config has none.
    run: (spec, logits_fn, params, x, labels, key, eps) -> AttackResult, with `eps` already a
      float32 [N] budget; no argument checks (it runs per batch, also under `jax.jit`).
    describe: spec -> a short human label for reports.
    targets_true_label: success means "now classified right" (correction) instead of "now
      wrong" (the untargeted attacks of robustness evaluation).
    min_classes: the fewest classes the attack is defined for (DLR needs 3, targeted DLR 4);
      the split driver checks it once, with a one-line error.
    run_split: runs a whole split instead of the driver's batch loop (autoattack, which
      re-batches the survivors of each component); same arguments and result as `attack_split`.
  """
  name: str
  section: str
  read: Reader
  run: Runner
  describe: Callable[["AttackSpec"], str]
  targets_true_label: bool = False
  min_classes: int = 2
  run_split: Callable[..., Any] | None = None


ATTACKS: Registry[AttackMethod] = Registry("attack")


def register(method: AttackMethod) -> AttackMethod:
  """Registers `method` under its name; errors list attacks in registration order."""
  ATTACKS.register(method.name)(method)
  return method


def attack_names() -> tuple[str, ...]:
  """Every registered attack, in registration order."""
  return tuple(name for name, _ in ATTACKS.items())


def untargeted_names() -> tuple[str, ...]:
  """The attacks whose success lowers accuracy, the ones robustness evaluation may run."""
  return tuple(name for name, method in ATTACKS.items() if not method.targets_true_label)


def sections() -> dict[str, str]:
  """Attack name -> the config sub-section holding its settings."""
  return {name: method.section for name, method in ATTACKS.items()}


def read_flag(section: ml_collections.ConfigDict, key: str, prefix: str, default: bool) -> bool:
  """`section[key]` (or `default`) if it is a bool; otherwise a ConfigError naming the key."""
  value = section.get(key, default)
  if not isinstance(value, bool):
    raise ConfigError(f"{prefix}.{key} must be True or False, got {value!r}")
  return value


def describe_steps(spec: AttackSpec) -> str:
  """The common start of a label: `pgd linf, 10 steps`."""
  return f"{spec.name} {spec.norm}, {spec.steps} steps"


def describe_restarts(spec: AttackSpec) -> str:
  """The restart count as a label suffix: `, 1 restart` or `, 3 restarts`."""
  return f", {spec.restarts} restart" + ("s" if spec.restarts > 1 else "")

"""The attack registry: the built-in attacks, names from config, and a new attack plugged in by a
registration alone (a toy sign-noise attack, registered here and removed afterwards)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from adcorda_jax import config_checks
from adcorda_jax.attacks import norms, specs
from adcorda_jax.attacks.losses import AttackResult, LogitsFn, score
from adcorda_jax.attacks.registry import ATTACKS, AttackMethod, register
from adcorda_jax.errors import ConfigError
from tests.helpers import one_line


def test_the_registry_lists_the_built_in_attacks():
  assert ATTACKS.names() == ["apgd_ce", "apgd_dlr", "apgd_t", "autoattack", "correct", "fab_t",
                             "fgsm", "pgd", "square"]
  # Registration order, the order errors list them in.
  assert specs.ATTACK_NAMES == ("fgsm", "pgd", "apgd_ce", "apgd_dlr", "apgd_t", "correct",
                                "fab_t", "square", "autoattack")
  assert specs.UNTARGETED == ("fgsm", "pgd", "apgd_ce", "apgd_dlr", "apgd_t", "fab_t", "square",
                              "autoattack")
  assert specs.SECTIONS == {"fgsm": "fgsm", "pgd": "pgd", "apgd_ce": "apgd", "apgd_dlr": "apgd",
                            "apgd_t": "apgd_t", "correct": "correct", "fab_t": "fab",
                            "square": "square", "autoattack": "autoattack"}
  assert [specs.AttackSpec(name).targets_true_label for name in specs.ATTACK_NAMES] == [
      name == "correct" for name in specs.ATTACK_NAMES]
  with pytest.raises(AttributeError):
    _ = specs.NOT_A_NAME


FAB_LABEL = "fab_t linf, 100 steps, 9 target classes, 1 restart"
SQUARE_LABEL = "square linf, 5000 queries, p_init 0.8, 1 restart"


def test_default_specs_describe_themselves_as_before():
  described = {name: specs.spec_from_config(name, "linf", None, f"robustness.{name}").describe()
               for name in specs.ATTACK_NAMES}
  assert described == {
      "fgsm": "fgsm linf",
      "pgd": "pgd linf, 10 steps of 2.5*eps/10, random start, 1 restart",
      "apgd_ce": "apgd_ce linf, 100 steps, 1 restart",
      "apgd_dlr": "apgd_dlr linf, 100 steps, 1 restart",
      "apgd_t": "apgd_t linf, 100 steps, 9 target classes, 1 restart",
      "correct": "correct linf, 10 steps of 2.5*eps/10",
      "fab_t": FAB_LABEL, "square": SQUARE_LABEL,
      "autoattack": "autoattack standard linf: apgd_ce linf, 100 steps, 1 restart, apgd_t linf, "
                    f"100 steps, 9 target classes, 1 restart, {FAB_LABEL}, {SQUARE_LABEL}"}
  assert specs.AttackSpec("correct", steps=3, step_size=0.5).describe() == (
      "correct linf, 3 steps of 0.5, random start")
  assert specs.AttackSpec("apgd_ce", norm="l2", restarts=3).describe() == (
      "apgd_ce l2, 10 steps, 3 restarts")


def _old_reading(section: ml_collections.ConfigDict, prefix: str,
                 default: str) -> tuple[specs.AttackSpec, ...]:
  """What tasks/robustness.py and adcorda/stages.py wrote out before attacks_from_config."""
  norm = config_checks.one_of(section, "norm", prefix, norms.NORMS, default="linf")
  names = specs.parse_attack_names(section.get("attacks", default), f"{prefix}.attacks",
                                   specs.UNTARGETED)
  return tuple(specs.spec_from_config(name, norm, section.get(specs.SECTIONS[name]),
                                      f"{prefix}.{specs.SECTIONS[name]}") for name in names)


@pytest.mark.parametrize("fields", [
    {}, {"attacks": "fgsm, pgd,apgd_ce", "norm": "l2"},
    {"attacks": "apgd_ce", "apgd": {"steps": 5, "rho": 0.5, "restarts": 2}},
    {"attacks": "pgd", "pgd": {"step_size": 0.01, "random_start": False, "early_stop": False}},
])
@pytest.mark.parametrize("prefix,default", [("robustness", "pgd"), ("evaluate", "pgd,apgd_ce")])
def test_attacks_from_config_builds_what_the_tasks_build(fields, prefix, default):
  section = ml_collections.ConfigDict(fields)
  assert specs.attacks_from_config(section, prefix, default) == _old_reading(section, prefix,
                                                                             default)


@pytest.mark.parametrize("fields,message", [
    ({"attacks": "pgd,apgd"},
     "unknown attack 'apgd' (robustness.attacks); valid names: fgsm, pgd, apgd_ce, apgd_dlr, apgd_t, fab_t, square, autoattack"),
    ({"attacks": "correct"},
     "unknown attack 'correct' (robustness.attacks); valid names: fgsm, pgd, apgd_ce, apgd_dlr, apgd_t, fab_t, square, autoattack"),
    ({"attacks": ""}, "robustness.attacks must name at least one attack; valid names: fgsm, "
                      "pgd, apgd_ce, apgd_dlr, apgd_t, fab_t, square, autoattack"),
    ({"attacks": 3}, "robustness.attacks must be a comma-separated string such as 'fgsm,pgd', "
                     "got 3"),
    ({"attacks": "pgd,pgd"}, "robustness.attacks='pgd,pgd' names an attack twice"),
    ({"norm": "l1"}, "robustness.norm='l1' is not valid; choose one of: linf, l2"),
    ({"attacks": "apgd_ce", "apgd": {"rho": 1.5}},
     "robustness.apgd.rho must be in (0, 1], got 1.5"),
    ({"pgd": {"random_start": 1}}, "robustness.pgd.random_start must be True or False, got 1"),
])
def test_attacks_from_config_errors_are_one_line_and_name_the_key(fields, message):
  section = ml_collections.ConfigDict(fields)
  with pytest.raises(ConfigError) as error:
    specs.attacks_from_config(section, "robustness", "pgd")
  assert one_line(error) == message
  with pytest.raises(ConfigError) as old_error:
    _old_reading(section, "robustness", "pgd")
  assert one_line(old_error) == message


# A toy attack defined here, in the test only: no other module knows it.
def _read_noise(section: ml_collections.ConfigDict, prefix: str) -> dict[str, Any]:
  return {"steps": config_checks.positive_int(section, "steps", prefix, default=1),
          "random_start": True}


def _run_noise(spec: specs.AttackSpec, logits_fn: LogitsFn, params: Any, x: jax.Array,
               labels: jax.Array, key: jax.Array, eps: jax.Array) -> AttackResult:
  """Adds sign noise of size eps, kept in the eps-ball and the [0, 1] box."""
  sign = jax.random.rademacher(key, x.shape, jnp.float32)
  adversarial = norms.project(x + norms.per_example(eps, x) * sign, x, eps, spec.norm)
  steps_used = jnp.ones(x.shape[:1], jnp.int32)
  result, _ = score(logits_fn, params, x, adversarial, labels, steps_used, spec.norm, False)
  return result


@pytest.fixture
def noise_attack():
  method = register(AttackMethod(name="noise", section="noise", read=_read_noise, run=_run_noise,
                                 describe=lambda spec: f"noise {spec.norm}"))
  try:
    yield method
  finally:
    ATTACKS.unregister("noise")


def test_a_registered_attack_is_selectable_without_other_edits(noise_attack):
  section = ml_collections.ConfigDict({"attacks": "pgd,noise", "noise": {"steps": 2}})
  pgd_spec, noise_spec = specs.attacks_from_config(section, "robustness", "pgd")
  assert noise_spec == specs.AttackSpec("noise", steps=2) and pgd_spec.name == "pgd"
  assert noise_spec.describe() == "noise linf" and noise_spec.method is noise_attack
  assert not noise_spec.targets_true_label
  assert specs.UNTARGETED[-1] == "noise" and "noise" in specs.ATTACK_NAMES
  bad = ml_collections.ConfigDict({"attacks": "noise", "noise": {"steps": 0}})
  with pytest.raises(ConfigError) as error:
    specs.attacks_from_config(bad, "robustness", "pgd")
  assert one_line(error) == "robustness.noise.steps must be an integer > 0, got 0"

  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  # Rows 2.. lie far enough inside [0, 1] to move the full eps; rows 0 and 1 sit on the box.
  x = jnp.asarray(rng.uniform(0.35, 0.65, size=(8, 4, 4, 1)), jnp.float32)
  x = x.at[0].set(0.0).at[1].set(1.0)
  labels = jnp.asarray(rng.integers(0, 3, size=8), jnp.int32)
  eps = jnp.linspace(0.0, 0.3, 8)
  result = noise_spec.run(lambda w, images: images.reshape(len(images), -1) @ w, weights, x,
                          labels, jax.random.key(0), eps)
  adversarial = np.asarray(result.adversarial)
  delta = np.abs(adversarial - np.asarray(x)).reshape(8, -1).max(axis=1)
  assert np.all(delta <= np.asarray(eps) + 1e-6) and delta[0] == 0.0
  assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
  np.testing.assert_allclose(delta[2:], np.asarray(eps)[2:], rtol=1e-6)


def test_a_temporary_attack_is_gone_afterwards():
  assert "noise" not in ATTACKS and "noise" not in specs.UNTARGETED
  with pytest.raises(ConfigError) as error:
    specs.AttackSpec("noise")
  assert one_line(error) == ("unknown attack 'noise' (attack.name); valid names: fgsm, pgd, "
                             "apgd_ce, apgd_dlr, apgd_t, correct, fab_t, square, autoattack")


def test_registering_a_name_twice_is_refused():
  with pytest.raises(ValueError, match="attack 'pgd' is already registered"):
    register(AttackMethod(name="pgd", section="pgd", read=_read_noise, run=_run_noise,
                          describe=lambda spec: "pgd"))
  assert ATTACKS.get("pgd").read is not _read_noise

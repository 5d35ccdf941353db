"""The `evaluate` config section: which attacks, budgets and batch size judge a model.

Read once, before any work, by every task that compares models (adcorda, quantize,
compression_study); one-line ConfigErrors name `evaluate.<key>`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from adcorda_jax import config_checks
from adcorda_jax.attacks.eps import eps_key
from adcorda_jax.attacks.specs import AttackSpec, attacks_from_config, check_eps_grid
from adcorda_jax.errors import ConfigError

PREFIX = "evaluate"


@dataclasses.dataclass(frozen=True)
class EvaluationSettings:
  """The validated `evaluate` section: robust accuracy of each model under these attacks."""
  specs: tuple[AttackSpec, ...]
  eps: tuple[float, ...]
  batch_size: int
  max_examples: int

  def summary(self, robust_examples: int) -> dict[str, Any]:
    """The `evaluate` block of results.json: attacks, their settings, eps and example count."""
    return {"attacks": [s.name for s in self.specs],
            "attack_descriptions": {s.name: s.describe() for s in self.specs},
            "norm": self.specs[0].norm, "eps": list(self.eps),
            "robust_examples": robust_examples}


def check_eps_names(eps: tuple[float, ...], config_key: str, value: Any) -> None:
  """Budgets must have distinct JSON keys (they name results and folders)."""
  keys = [eps_key(e) for e in eps]
  if len(set(keys)) != len(keys):
    raise ConfigError(f"{config_key} has values too close to tell apart: {value!r}")


def read_evaluation(config: ml_collections.ConfigDict) -> EvaluationSettings:
  """Checks `config.evaluate`; one-line ConfigErrors name `evaluate.<key>`."""
  section = config.get(PREFIX)
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError(f"config has no {PREFIX!r} section; start from configs/adcorda_digits.py")
  specs = attacks_from_config(section, PREFIX, default="pgd,apgd_ce")
  eps = check_eps_grid(section.get("eps", ()), f"{PREFIX}.eps")
  check_eps_names(eps, f"{PREFIX}.eps", section.get("eps"))
  return EvaluationSettings(
      specs=specs, eps=eps,
      batch_size=config_checks.positive_int(section, "batch_size", PREFIX, default=256),
      max_examples=config_checks.positive_int(section, "max_examples", PREFIX, default=0,
                                              allow_zero=True))

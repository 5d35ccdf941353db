"""`task=adcorda` settings: every AdCorDA section, checked before any stage starts.

`read_settings` checks `adcorda`, `correct`, `adapt`, `evaluate` and `model.quant`, and the batch
sizes against the device mesh, so a bad value is a one-line ConfigError naming the key before the
baseline trains, never after the correction has run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import ml_collections

from adcorda_jax import config_checks
from adcorda_jax.adcorda import correction_set
from adcorda_jax.adcorda.alignment import AlignmentLoss, alignment_loss
from adcorda_jax.attacks import norms
from adcorda_jax.attacks.specs import AttackSpec, check_eps, spec_from_config
from adcorda_jax.errors import ConfigError
from adcorda_jax.evaluate import EvaluationSettings, read_evaluation
from adcorda_jax.quant.deploy import (Deployment, FloatDeployment, Quantization,
                                      quantization_from_config)
from adcorda_jax.training import sharding
from adcorda_jax.training.finetune import (ALIGNMENT_KEYS, FinetuneSettings,
                                          read_finetune_settings, without_alignment)

__all__ = ["ADCORDA_ONLY_KEYS", "ALIGNMENT_KEYS", "AdaptationSettings", "CorrectionSettings",
           "Settings", "read_adaptation", "read_correction", "read_settings", "without_alignment"]

@dataclasses.dataclass(frozen=True)
class CorrectionSettings:
  """Stage 1, adversarial correction: the `correct` section."""
  spec: AttackSpec
  eps: float
  on_failure: str
  batch_size: int


# The readings of the method a reader could take from the paper's abstract (`adapt.<key>`;
# the first value of each is the paper's method as this project runs it):
DIRECTIONS = ("forward", "reverse")          # forward: corrected set labelled source, original
#                                              set target; reverse: original source, corrected
#                                              target (aligned the other way).
SOURCES = ("corrected_set", "corrected_subset")  # The whole corrected training set, or only the
#                                              corrected (formerly misclassified) images.
STARTS = ("baseline", "corrected_ce")        # Adapt from the baseline, or from the model first
#                                              fine-tuned on the corrected set (corrected_ce).
# Keys only the aligned `adcorda` variant reads; `adapt.start` is read by it and by the
# same-budget control too (whose budget doubles with start=corrected_ce).
METHOD_KEYS = frozenset({"adapt.direction", "adapt.source"})
ADCORDA_ONLY_KEYS = ALIGNMENT_KEYS | METHOD_KEYS


@dataclasses.dataclass(frozen=True)
class AdaptationSettings:
  """Stage 2, domain adaptation: the `adapt` section with AdCorDA's alignment loss."""
  finetune: FinetuneSettings
  alignment: str
  lambda_: float
  direction: str = "forward"
  source: str = "corrected_set"
  start: str = "baseline"

  @property
  def alignment_loss(self) -> AlignmentLoss:
    return alignment_loss(self.alignment)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The validated AdCorDA config: baseline, the paper's two stages, evaluation, deployment."""
  seed: int
  baseline_checkpoint: Path | None
  seeds: tuple[int, ...]
  plot_examples: int
  correct: CorrectionSettings
  adapt: AdaptationSettings
  evaluation: EvaluationSettings
  deployment: Deployment


def _section(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  section = config.get(name)
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError(f"config has no {name!r} section; start from configs/adcorda_digits.py")
  return section


def _seeds(value: Any) -> tuple[int, ...]:
  values = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
  if (not isinstance(values, (tuple, list)) or not values
      or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values)
      or len(set(values)) != len(values)):
    raise ConfigError(f"adcorda.seeds must be a non-empty tuple of distinct integers >= 0, "
                      f"got {value!r}")
  return tuple(values)


def read_correction(config: ml_collections.ConfigDict) -> CorrectionSettings:
  """Checks `config.correct`; one-line ConfigErrors name `correct.<key>`."""
  correct = _section(config, "correct")
  norm = config_checks.one_of(correct, "norm", "correct", norms.NORMS, default="linf")
  eps = check_eps(correct.get("eps", None), "correct.eps")
  if eps == 0:
    raise ConfigError("correct.eps must be > 0 (the correction budget), got 0")
  return CorrectionSettings(
      spec=spec_from_config("correct", norm, correct, "correct"), eps=eps,
      on_failure=correction_set.check_failure_policy(correct.get("on_failure", "keep_original")),
      batch_size=config_checks.positive_int(correct, "batch_size", "correct", default=256))


def read_adaptation(config: ml_collections.ConfigDict) -> AdaptationSettings:
  """Checks `config.adapt` (fine-tuning and alignment); one-line ConfigErrors name the key."""
  finetune = read_finetune_settings(config)
  section = config.adapt
  lambda_ = config_checks.positive_float(section, "lambda_", "adapt", allow_zero=True)
  name = section.get("alignment", "coral")
  alignment_loss(name)  # Raises a ConfigError naming adapt.alignment.
  return AdaptationSettings(
      finetune=finetune, alignment=name, lambda_=lambda_,
      direction=config_checks.one_of(section, "direction", "adapt", DIRECTIONS,
                                     default=DIRECTIONS[0]),
      source=config_checks.one_of(section, "source", "adapt", SOURCES, default=SOURCES[0]),
      start=config_checks.one_of(section, "start", "adapt", STARTS, default=STARTS[0]))


def read_settings(config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh | None = None) -> Settings:
  """Checks every AdCorDA section before any work starts; one-line ConfigErrors name the key."""
  seed = config.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ConfigError(f"seed must be an integer, got {seed!r}")
  section = _section(config, "adcorda")
  checkpoint = section.get("baseline_checkpoint", "")
  if not isinstance(checkpoint, str):
    raise ConfigError(f"adcorda.baseline_checkpoint must be a path string ('' = train one), "
                      f"got {checkpoint!r}")
  correct = read_correction(config)
  evaluation = read_evaluation(config)
  settings = Settings(
      seed=seed,
      baseline_checkpoint=Path(checkpoint).expanduser().absolute() if checkpoint.strip() else None,
      seeds=_seeds(section.get("seeds", (0,))),
      plot_examples=config_checks.positive_int(section, "plot_examples", "adcorda", default=8,
                                               allow_zero=True),
      correct=correct, adapt=read_adaptation(config), evaluation=evaluation,
      deployment=_weight_quantization(config) or FloatDeployment())
  mesh = mesh if mesh is not None else sharding.make_mesh()
  for batch_size, key in ((correct.batch_size, "correct.batch_size"),
                          (settings.adapt.finetune.batch_size, "adapt.batch_size"),
                          (evaluation.batch_size, "evaluate.batch_size")):
    sharding.check_divisible(batch_size, key, mesh)
  return settings


def _weight_quantization(config: ml_collections.ConfigDict) -> Quantization | None:
  """`model.quant` for AdCorDA: weights only, BatchNorm kept (fine-tuning trains it)."""
  quant = quantization_from_config(config.get("model"))
  if quant is not None and quant.activation_spec is not None:
    raise ConfigError("model.quant.activation_bits is not supported by task=adcorda (weights "
                      "are quantized, activations stay float); set it to 0, or use "
                      "task=quantize for activation quantization")
  if quant is not None and quant.fold_batch_norm:
    raise ConfigError("model.quant.fold_batch_norm=True is not supported by task=adcorda "
                      "(fine-tuning updates BatchNorm); set it to False")
  return quant

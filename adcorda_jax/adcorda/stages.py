"""`task=adcorda` stages: what each reads from the config, and the bookkeeping of resuming.

`read_settings` checks every AdCorDA section before any work starts (one-line ConfigErrors naming
the key).

Each stage's folder holds `stage.json`, the fingerprint of everything its artifact depends on as
flat dotted config keys (`correct.eps`, `adapt.lambda_`, ...) plus content digests of its inputs
(`baseline.params_sha1`). A later stage's fingerprint includes the earlier ones, so a config change
is reported at the first stage it invalidates, with a one-line CheckpointError naming the keys, and
artifacts made under two configs never mix. A finished stage also writes `done.json` (its small
outputs) last, atomically: present means finished, absent means resume or redo.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import jax
import ml_collections
import numpy as np

from adcorda_jax import config_checks
from adcorda_jax import workdir as workdir_lib
from adcorda_jax.adcorda import correction_set, finetune
from adcorda_jax.attacks import norms
from adcorda_jax.attacks.specs import (
  SECTIONS,
  UNTARGETED,
  AttackSpec,
  check_eps,
  check_eps_grid,
  parse_attack_names,
  spec_from_config,
)
from adcorda_jax.errors import CheckpointError, ConfigError
from adcorda_jax.quant.deploy import Quantization, float_model_config, quantization_from_config
from adcorda_jax.reporting.robustness_report import eps_key
from adcorda_jax.training import trainer

STAGE_FILE = "stage.json"
DONE_FILE = "done.json"
# Keys that change logging or checkpoint cadence only: never part of a fingerprint.
RESUMABLE_KEYS = workdir_lib.RESUMABLE_KEYS | {
    "adapt.log_every_steps", "adapt.max_checkpoints", "adapt.checkpoint_every_steps"}
# Keys read only by the aligned fine-tuning: the cross-entropy-only runs (controls, QAT, pruning
# and study fine-tuning) leave them out of their fingerprints, so changing them redoes only the
# runs that use them. Records written before this rule still match without them.
ALIGNMENT_KEYS = frozenset({"adapt.alignment", "adapt.lambda_"})


def without_alignment(fingerprint: dict[str, Any]) -> dict[str, Any]:
  """`fingerprint` for a run that does not read the alignment keys."""
  return {k: v for k, v in fingerprint.items() if k not in ALIGNMENT_KEYS}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The validated `adcorda`, `correct`, `adapt` and `evaluate` sections."""
  baseline_checkpoint: Path | None
  seeds: tuple[int, ...]
  plot_examples: int
  correct_spec: AttackSpec
  correct_eps: float
  on_failure: str
  correct_batch_size: int
  adapt: finetune.AdaptSettings
  eval_specs: tuple[AttackSpec, ...]
  eval_eps: tuple[float, ...]
  eval_batch_size: int
  max_examples: int
  quant: Quantization | None
  evaluation: Evaluation


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


def read_settings(config: ml_collections.ConfigDict) -> Settings:
  """Checks every AdCorDA section before any work starts; one-line ConfigErrors name the key."""
  section = _section(config, "adcorda")
  checkpoint = section.get("baseline_checkpoint", "")
  if not isinstance(checkpoint, str):
    raise ConfigError(f"adcorda.baseline_checkpoint must be a path string ('' = train one), "
                      f"got {checkpoint!r}")
  correct = _section(config, "correct")
  correct_norm = config_checks.one_of(correct, "norm", "correct", norms.NORMS, default="linf")
  correct_eps = check_eps(correct.get("eps", None), "correct.eps")
  if correct_eps == 0:
    raise ConfigError("correct.eps must be > 0 (the correction budget), got 0")
  evaluation = read_evaluation(config)
  return Settings(
      baseline_checkpoint=Path(checkpoint).expanduser().absolute() if checkpoint.strip() else None,
      seeds=_seeds(section.get("seeds", (0,))),
      plot_examples=config_checks.positive_int(section, "plot_examples", "adcorda", default=8,
                                               allow_zero=True),
      correct_spec=spec_from_config("correct", correct_norm, correct, "correct"),
      correct_eps=correct_eps,
      on_failure=correction_set.check_failure_policy(correct.get("on_failure", "keep_original")),
      correct_batch_size=config_checks.positive_int(correct, "batch_size", "correct",
                                                    default=256),
      adapt=finetune.read_adapt_settings(config),
      evaluation=evaluation, eval_specs=evaluation.specs, eval_eps=evaluation.eps,
      eval_batch_size=evaluation.batch_size, max_examples=evaluation.max_examples,
      quant=_weight_quantization(config))


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The validated `evaluate` section: robust accuracy of each model under these attacks."""
  specs: tuple[AttackSpec, ...]
  eps: tuple[float, ...]
  batch_size: int
  max_examples: int


def read_evaluation(config: ml_collections.ConfigDict) -> Evaluation:
  """Checks `config.evaluate`; one-line ConfigErrors name `evaluate.<key>`."""
  evaluate = _section(config, "evaluate")
  norm = config_checks.one_of(evaluate, "norm", "evaluate", norms.NORMS, default="linf")
  names = parse_attack_names(evaluate.get("attacks", "pgd,apgd_ce"), "evaluate.attacks",
                             UNTARGETED)
  eps = check_eps_grid(evaluate.get("eps", ()), "evaluate.eps")
  keys = [eps_key(e) for e in eps]
  if len(set(keys)) != len(keys):
    raise ConfigError(f"evaluate.eps has values too close to tell apart: {evaluate.eps!r}")
  return Evaluation(
      specs=tuple(spec_from_config(name, norm, evaluate.get(SECTIONS[name]),
                                   f"evaluate.{SECTIONS[name]}") for name in names),
      eps=eps,
      batch_size=config_checks.positive_int(evaluate, "batch_size", "evaluate", default=256),
      max_examples=config_checks.positive_int(evaluate, "max_examples", "evaluate", default=0,
                                              allow_zero=True))


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


def baseline_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `task=train` config of the baseline trained in `<workdir>/baseline`.

  The baseline is always the float network: `model.quant` says how later stages quantize it.
  """
  plain = config.to_dict()
  if isinstance(plain.get("model"), dict):
    plain["model"] = float_model_config(plain["model"])
  return ml_collections.ConfigDict(
      {"task": "train", **{k: plain[k] for k in ("seed", "distributed", "cpu_devices", "data",
                                                 "model", "train") if k in plain}})


def ensure_baseline(config: ml_collections.ConfigDict, checkpoint: Path | None, key: str,
                    workdir: Path, directory: Path | None = None
                    ) -> tuple[Path, dict[str, Any]]:
  """(checkpoint path, fingerprint) of the baseline: `checkpoint` (config key `key`) if given,
  else the float model trained (or resumed, or loaded) in `directory` (`<workdir>/baseline`)."""
  if checkpoint is not None:
    return checkpoint, {key: str(checkpoint)}
  directory = directory if directory is not None else workdir / "baseline"
  train_config = baseline_config(config)
  recorded = directory / workdir_lib.CONFIG_FILE
  if recorded.exists():
    changed = workdir_lib.config_differences(workdir_lib.read_json(recorded),
                                             workdir_lib.config_to_dict(train_config))
    if changed:
      raise CheckpointError(
          f"stage {directory.name!r} in {str(directory)!r} was made with a different config "
          f"(differs at: {shown(changed)}); restore those values, or delete that folder (and "
          "the later stages' folders) to redo it, or use a new --workdir")
  trainer.train_and_evaluate(train_config, directory)
  return directory, {key: "", **config_fingerprint(train_config,
                                                   ("seed", "data", "model", "train"))}


def config_fingerprint(config: ml_collections.ConfigDict, sections: Iterable[str]
                       ) -> dict[str, Any]:
  """The flat {dotted key: value} of the named top-level fields/sections of `config`."""
  plain = workdir_lib.config_to_dict(config)
  flat: dict[str, Any] = {}

  def add(prefix: str, value: Any) -> None:
    if isinstance(value, dict):
      for key, item in value.items():
        add(f"{prefix}.{key}", item)
    elif prefix not in RESUMABLE_KEYS:
      flat[prefix] = value

  for name in sections:
    add(name, plain.get(name))
  return flat


def tree_digest(tree: Any) -> str:
  """A SHA-1 of a pytree of arrays (paths, shapes, dtypes and bytes)."""
  digest = hashlib.sha1()
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  for path, leaf in leaves:
    array = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}{array.shape}{array.dtype.str}".encode())
    digest.update(memoryview(array).cast("B"))
  return digest.hexdigest()


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Keys whose values differ between two flat fingerprints (JSON-normalized)."""
  old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
  return sorted(k for k in set(old) | set(new) if old.get(k, None) != new.get(k, None))


def shown(keys: list[str], limit: int = 5) -> str:
  return ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else "")


def claim(directory: Path, stage: str, fingerprint: dict[str, Any]) -> None:
  """Records `fingerprint` in `directory`, or checks it equals the one recorded there.

  Raises a one-line CheckpointError naming the differing keys and what to delete.
  """
  path = directory / STAGE_FILE
  if path.exists():
    recorded = workdir_lib.read_json(path)
    recorded = {k: v for k, v in (recorded if isinstance(recorded, dict) else {}).items()
                if k in fingerprint or k not in ALIGNMENT_KEYS}
    changed = differences(recorded, fingerprint)
    if changed:
      raise CheckpointError(
          f"stage {stage!r} in {str(directory)!r} was made with a different config (differs at: "
          f"{shown(changed)}); restore those values, or delete that folder (and the later "
          "stages' folders) to redo it, or use a new --workdir")
    return
  directory.mkdir(parents=True, exist_ok=True)
  workdir_lib.write_json_atomic(path, fingerprint)


def load_done(directory: Path) -> dict[str, Any] | None:
  """The outputs a finished stage recorded in `directory`, or None if it has not finished."""
  path = directory / DONE_FILE
  return workdir_lib.read_json(path) if path.exists() else None


def mark_done(directory: Path, outputs: dict[str, Any]) -> None:
  workdir_lib.write_json_atomic(directory / DONE_FILE, outputs)

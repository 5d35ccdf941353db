"""`task=robustness`: clean and robust accuracy of a trained checkpoint under attacks and budgets.

    python main.py --config configs/robustness.py --workdir runs/robustness \\
        --config.robustness.checkpoint=runs/default

The model is rebuilt from the checkpoint's metadata and the data from the training run's own
`config.json` (its `data` section and `seed`), so the evaluated split is exactly the one the model
was held out from. Each (attack, eps) pair is a resumable `attack_split` run under
`<workdir>/attacks/<attack>_<norm>_eps<eps>/`; rerunning the same command resumes an interrupted
run at its first unfinished batch and returns the saved results of a finished one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypedDict

import jax
import ml_collections
import numpy as np
from absl import logging

from adcorda_jax import config_checks, pipeline
from adcorda_jax.attacks import flags as flags_lib, norms
from adcorda_jax.attacks.driver import BatchCallback, SplitAttackResult, attack_split
from adcorda_jax.attacks.model_fn import attack_model
from adcorda_jax.attacks.eps import eps_dir_tag, eps_key, eps_label
from adcorda_jax.attacks.specs import AttackSpec, attacks_from_config, check_eps_grid
from adcorda_jax.data import load_dataset
from adcorda_jax.errors import ConfigError
from adcorda_jax.evaluate.settings import check_eps_names
from adcorda_jax.reporting import robustness_report
from adcorda_jax.training import checkpointing, sharding
from adcorda_jax.training.provenance import check_data_matches, training_data

_PREFIX = "robustness"
SPLITS = ("test", "val", "train")
ATTACKS_DIR = "attacks"


@dataclasses.dataclass(frozen=True)
class Settings:
  """The validated `config.robustness` section."""
  checkpoint: Path
  split: str
  norm: str
  specs: tuple[AttackSpec, ...]
  eps: tuple[float, ...]
  batch_size: int
  max_examples: int
  save_adversarial: bool
  data_dir: str


class RobustnessResults(TypedDict):
  """`results.json` of task=robustness (besides the envelope: status, task, devices, config...)."""
  checkpoint: str
  dataset: str
  data_source: str
  model: str
  split: str
  num_examples: int
  norm: str
  attacks: list[str]                          # Config order (JSON sorts dict keys).
  eps: list[float]
  clean_accuracy: float | None
  robust_accuracy: dict[str, dict[str, float]]  # attack -> eps key -> accuracy.
  worst_case_accuracy: dict[str, float]       # eps key -> correct under every attack.
  records: list[dict[str, Any]]               # One per (attack, eps).
  attack_descriptions: dict[str, str]
  flags: dict[str, Any]                       # AutoAttack's sanity checks (attacks/flags.py).


def read_settings(config: ml_collections.ConfigDict) -> Settings:
  """Checks `config.robustness` before anything is loaded; one-line ConfigErrors name the key."""
  section = config.get(_PREFIX)
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError("config has no 'robustness' section; start from configs/robustness.py")
  checkpoint = section.get("checkpoint", "")
  if not isinstance(checkpoint, str) or not checkpoint.strip():
    raise ConfigError(f"{_PREFIX}.checkpoint must name a training run's workdir or checkpoint "
                      f"folder, e.g. --config.{_PREFIX}.checkpoint=runs/default, "
                      f"got {checkpoint!r}")
  split = config_checks.one_of(section, "split", _PREFIX, SPLITS, default="test")
  norm = config_checks.one_of(section, "norm", _PREFIX, norms.NORMS, default="linf")
  specs = attacks_from_config(section, _PREFIX, default="pgd")
  eps = check_eps_grid(section.get("eps", ()), f"{_PREFIX}.eps")
  check_eps_names(eps, f"{_PREFIX}.eps", section.get("eps"))
  save_adversarial = section.get("save_adversarial", False)
  if not isinstance(save_adversarial, bool):
    raise ConfigError(f"{_PREFIX}.save_adversarial must be True or False, "
                      f"got {save_adversarial!r}")
  data_dir = section.get("data_dir", "")
  if not isinstance(data_dir, str):
    raise ConfigError(f"{_PREFIX}.data_dir must be a string path ('' = as trained), "
                      f"got {data_dir!r}")
  return Settings(
      checkpoint=Path(checkpoint).expanduser().absolute(), split=split, norm=norm, specs=specs,
      eps=eps, batch_size=config_checks.positive_int(section, "batch_size", _PREFIX, default=256),
      max_examples=config_checks.positive_int(section, "max_examples", _PREFIX, default=0,
                                              allow_zero=True),
      save_adversarial=save_adversarial, data_dir=data_dir)


def _record(spec: AttackSpec, result: SplitAttackResult) -> dict[str, Any]:
  record = {"attack": spec.name, "norm": spec.norm, "eps": result.eps,
            "eps_label": eps_label(result.eps),
            "robust_accuracy": result.robust_accuracy, "success_rate": result.success_rate,
            "mean_perturbation_norm": result.mean_perturbation_norm,
            "mean_steps": result.mean_steps, "seconds": result.seconds,
            "resumed_batches": result.loaded_batches}
  if result.details and "cascade" in result.details:  # autoattack: each attack's share.
    record["cascade"] = result.details["cascade"]
  return record


def run_robustness(config: ml_collections.ConfigDict, workdir: str | Path,
                   batch_callback: BatchCallback | None = None) -> dict[str, Any]:
  """Evaluates `config.robustness.checkpoint` under every configured attack and eps.

  Args:
    config: the experiment config (see configs/robustness.py).
    workdir: run directory; an existing run there is resumed or, if finished, returned.
    batch_callback: passed to every `attack_split` (called with each finished batch index).
  Returns:
    The results dict, also saved as `<workdir>/results.json` (plus report.md, robustness.png).
  """
  with pipeline.open_run(workdir, config, task=config.get("task", "robustness")) as run:
    if run.finished is not None:
      return run.finished
    return _evaluate(config, run, batch_callback)


def _evaluate(config: ml_collections.ConfigDict, run: pipeline.Run,
              batch_callback: BatchCallback | None) -> dict[str, Any]:
  workdir = run.path
  settings = read_settings(config)
  seed = config.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ConfigError(f"seed must be an integer, got {seed!r}")

  variables, meta = checkpointing.load_checkpoint(settings.checkpoint)
  model = checkpointing.model_from_meta(meta)
  data_config, data_seed, data_source = training_data(settings.checkpoint, meta,
                                                      settings.data_dir)
  dataset = load_dataset(data_config, data_seed)
  check_data_matches(dataset, meta, settings.checkpoint)
  split = getattr(dataset, settings.split)
  count = len(split) if settings.max_examples == 0 else min(settings.max_examples, len(split))
  if count == 0:
    raise ConfigError(f"{_PREFIX}.split={settings.split!r} has no examples in this run's data")
  images, labels = split.images[:count], split.labels[:count]  # The first max_examples.

  mesh = sharding.make_mesh()
  sharding.check_divisible(settings.batch_size, f"{_PREFIX}.batch_size", mesh)
  logits_fn, params = attack_model(model, variables)
  key = jax.random.key(seed)
  run.claim()  # Config, checkpoint, data and mesh are checked: work starts here.
  logging.info("Robustness of %s on %d %s %s examples: attacks %s, eps %s, %d device(s).",
               meta["model"]["name"], count, dataset.name, settings.split,
               ", ".join(s.name for s in settings.specs), settings.eps, mesh.devices.size)
  records, clean_accuracy, outcomes = [], None, []
  robust_to_all: dict[str, np.ndarray] = {}  # eps key -> [N] bool, correct under every attack.
  model_flags = flags_lib.model_flags(logits_fn, params, images, labels)
  for spec in settings.specs:
    for eps in settings.eps:
      tag = eps_dir_tag(eps)
      result = attack_split(
          spec, logits_fn, params, images, labels, eps=eps, batch_size=settings.batch_size,
          key=key, mesh=mesh, out_dir=workdir / ATTACKS_DIR / f"{spec.name}_{spec.norm}_eps{tag}",
          save_adversarial=settings.save_adversarial,
          description=f"{spec.name} eps={eps_label(eps)}",
          batch_size_key=f"{_PREFIX}.batch_size", batch_callback=batch_callback)
      if clean_accuracy is None:
        clean_accuracy = result.clean_accuracy
      records.append(_record(spec, result))
      outcomes.append((spec.name, eps, result))
      name = eps_key(eps)
      robust_to_all[name] = robust_to_all.get(name, result.final_correct) & result.final_correct
      logging.info("%s eps=%s: robust accuracy %.4f (clean %.4f), %.1f s", spec.name,
                   eps_label(eps), result.robust_accuracy,
                   result.clean_accuracy, result.seconds)

  robust = {spec.name: {eps_key(r["eps"]): r["robust_accuracy"]
                        for r in records if r["attack"] == spec.name}
            for spec in settings.specs}
  results = run.results(**RobustnessResults(
      checkpoint=str(settings.checkpoint), dataset=dataset.name, data_source=data_source,
      model=meta["model"]["name"], split=settings.split, num_examples=count, norm=settings.norm,
      attacks=[spec.name for spec in settings.specs],
      eps=list(settings.eps), clean_accuracy=clean_accuracy, robust_accuracy=robust,
      # Per eps, the fraction that every attack failed on (per example, as AutoAttack counts).
      worst_case_accuracy={k: float(np.mean(v)) for k, v in robust_to_all.items()},
      records=records,
      attack_descriptions={spec.name: spec.describe() for spec in settings.specs},
      flags=flags_lib.report_flags(model_flags, flags_lib.split_square_gains(outcomes),
                                   str(settings.checkpoint))))
  return run.finish(
      results, report=robustness_report.robustness_markdown(results),
      summary=f"clean accuracy {clean_accuracy:.4f}",
      plots=[lambda: robustness_report.plot_robustness(results, workdir / "robustness.png")])

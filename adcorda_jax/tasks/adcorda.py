"""`task=adcorda`: AdCorDA (arXiv 2401.13212) with its controls, end to end and resumable.

    python main.py --config configs/adcorda_digits.py --workdir runs/adcorda_digits

The paper's two stages between a baseline and an evaluation, each a function below and a folder
of the workdir with a fingerprint (`pipeline.Stage`):

* `baseline/`: train the classifier (`task=train` on `data`/`model`/`train`), unless
  `adcorda.baseline_checkpoint` names another run's checkpoint.
* Stage 1, adversarial correction, `correct/`: the baseline's misclassified (un-augmented)
  training images are moved within `correct.eps` toward their true label by the `correct`
  attack; the corrected training set (`corrected_set.npz` + provenance/statistics) replaces them.
* Stage 2, domain adaptation, `adapt/<variant>/seed<k>/`: fine-tuning from the baseline, once per
  seed in `adcorda.seeds`: `corrected_ce` (corrected set, cross-entropy), `same_budget_finetune`
  (original set, same optimizer, schedule and steps), `adcorda` (corrected set as labelled source,
  original set as target, cross-entropy + `adapt.lambda_` * alignment of penultimate features).
  Readings of the method besides the paper's are config values of the `adcorda` variant:
  `adapt.direction='reverse'` (original set labelled source, corrected set target),
  `adapt.source='corrected_subset'` (only the corrected images), `adapt.start='corrected_ce'`
  (adapt the corrected_ce model; the same-budget control then trains twice as long too).
* `evaluate/<variant>/seed<k>/`: clean train/val/test accuracy and robust test accuracy under
  `evaluate.attacks` at `evaluate.eps`.

With `model.quant.weight_bits` > 0 (AdCorDA on weight-quantized networks) the deployment
(`quant.deploy.Deployment`) is post-training quantization: stage 1 attacks the quantized
baseline, and every fine-tuning runs with fake-quantized kernels in the loop (straight-through
gradients to float weights), so `same_budget_finetune` is the QAT control; results also list the
variants under quantization names (`ptq_w4_per_channel`, `qat_w4`, `adcorda_w4`) with sizes.

The same command on the same workdir skips finished stages and resumes an interrupted one; a
config change that invalidates a stage is a one-line CheckpointError naming the keys.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, TypedDict

import jax
import ml_collections
import numpy as np
from absl import logging

from adcorda_jax import pipeline
from adcorda_jax.adcorda import correction_set
from adcorda_jax.adcorda.settings import (ADCORDA_ONLY_KEYS, ALIGNMENT_KEYS, Settings,
                                          read_settings)
from adcorda_jax.attacks.driver import BatchCallback, SplitAttackResult, attack_split
from adcorda_jax.attacks.model_fn import attack_model
from adcorda_jax.attacks.specs import AttackSpec
from adcorda_jax.errors import ConfigError
from adcorda_jax.evaluate import Evaluator, aggregate, make_predictor
from adcorda_jax.evaluate.evaluator import Predictor
from adcorda_jax.pipeline.fingerprint import config_keys, tree_digest
from adcorda_jax.reporting import adcorda_report
from adcorda_jax.training import batches, checkpointing, finetune, input_pipeline, sharding
from adcorda_jax.training.baseline import Baseline, load_baseline

VARIANTS = ("baseline", "corrected_ce", "same_budget_finetune", "adcorda")
FINETUNED = VARIANTS[1:]
AdaptCallback = Callable[[str, int, int], None]  # (variant, seed, step)


class AdcordaResults(TypedDict, total=False):
  """`results.json` of task=adcorda (besides the envelope: status, task, devices, config...)."""
  dataset: str
  model: str
  baseline_checkpoint: str
  data_source: str
  num_train: int
  num_test: int
  seeds: list[int]
  variant_order: list[str]
  variants: dict[str, dict[str, Any]]     # variant -> aggregate over seeds, plus size_bytes.
  correction: dict[str, Any]              # stage 1 statistics and the attack's description.
  adapt: dict[str, Any]                   # stage 2 steps and settings.
  evaluate: dict[str, Any]
  quantization: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class DeployedBaseline:
  """The baseline as deployed (quantized or float), its training predictions and fingerprint."""
  baseline: Baseline
  variables: dict[str, Any]      # Deployed variables: what is attacked and evaluated.
  prediction: np.ndarray         # [N] on the training set.
  fingerprint: dict[str, Any]    # Baseline keys + deployment keys + seed.
  predict: Predictor
  mesh: jax.sharding.Mesh


@dataclasses.dataclass(frozen=True)
class Correction:
  """Stage 1's output: the corrected training set and its fingerprint."""
  corrected: correction_set.CorrectedSet
  fingerprint: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Adaptation:
  """Stage 2's output: the deployed variables of each (variant, seed) and the budget used."""
  refined: dict[tuple[str, int], dict[str, Any]]
  fingerprint: dict[str, Any]
  total_steps: int
  steps_per_epoch: int


def run_adcorda(config: ml_collections.ConfigDict, workdir: str | Path, *,
                correct_batch_callback: BatchCallback | None = None,
                adapt_step_callback: AdaptCallback | None = None) -> dict[str, Any]:
  """Runs every AdCorDA stage and control in `workdir`; returns (and saves) the results.

  Args:
    config: the experiment config (see configs/adcorda_digits.py).
    workdir: run directory; finished stages are loaded, an interrupted one resumed.
    correct_batch_callback: called with each finished batch index of the correction attack.
    adapt_step_callback: called as (variant, seed, step) after each fine-tuning step.
  """
  with pipeline.open_run(workdir, config, task=config.get("task", "adcorda"),
                         strict=False) as run:
    if run.finished is not None:
      return run.finished
    settings = read_settings(config)
    run.claim()  # Every setting is checked, against the mesh too: work starts here.
    base = deployed_baseline(run, config, settings)
    correction = correct(run, config, settings, base, correct_batch_callback)
    adaptation = adapt(run, config, settings, base, correction, adapt_step_callback)
    return evaluate_and_report(run, config, settings, base, correction, adaptation)


def deployed_baseline(run: pipeline.Run, config: ml_collections.ConfigDict,
                      settings: Settings) -> DeployedBaseline:
  """The baseline (trained in `baseline/` or loaded), deployed, and its training predictions."""
  baseline = load_baseline(config, settings.baseline_checkpoint, "adcorda.baseline_checkpoint",
                           run.path)
  mesh = sharding.make_mesh()
  predict = make_predictor(baseline.model.apply, settings.evaluation.batch_size, mesh)
  deployment = settings.deployment
  deployed = deployment.deploy(baseline.variables)
  deployment_keys = deployment.fingerprint()
  if deployment_keys:  # Quantized.
    logging.info("Quantized AdCorDA: %s kernels (%s, %s calibration).", deployment.tag,
                 deployment.granularity.replace("_", " "), deployment.calibration)
  return DeployedBaseline(
      baseline=baseline, variables=deployed,
      prediction=predict(deployed, baseline.dataset.train.images),
      fingerprint={**baseline.fingerprint, **deployment_keys, "seed": settings.seed},
      predict=predict, mesh=mesh)


def _checkpoint_step(path: Path) -> int:
  step = checkpointing.checkpoint_step(path)
  return int(step if step is not None else -1)


def _empty_correction(spec: AttackSpec, eps: float, images: np.ndarray) -> SplitAttackResult:
  """The `correct` result over zero rows (nothing was misclassified)."""
  none = np.zeros(0, bool)
  return SplitAttackResult(
      spec=spec, eps=eps, clean_prediction=np.zeros(0, np.int32), clean_correct=none,
      success=none, final_correct=none, steps_used=np.zeros(0, np.int32),
      perturbation_norm=np.zeros(0, np.float32), adversarial=images[:0], seconds=0.0,
      computed_batches=0, loaded_batches=0, path=None)


def correct(run: pipeline.Run, config: ml_collections.ConfigDict, settings: Settings,
            base: DeployedBaseline, batch_callback: BatchCallback | None) -> Correction:
  """Stage 1: builds (or loads) the corrected training set in `correct/`."""
  workdir, baseline, options = run.path, base.baseline, settings.correct
  train = baseline.dataset.train
  fingerprint = {**base.fingerprint, **config_keys(config, ("correct",))}
  # The in-workdir baseline is named relative to the workdir, so a moved workdir still resumes.
  checkpoint = baseline.checkpoint
  provenance = correction_set.correction_provenance(
      checkpoint_path=str(checkpoint.relative_to(workdir) if checkpoint.is_relative_to(workdir)
                          else checkpoint), checkpoint_step=_checkpoint_step(checkpoint),
      spec=options.spec, eps=options.eps, on_failure=options.on_failure,
      images=train.images, labels=train.labels)
  provenance["params_sha1"] = baseline.fingerprint["baseline.params_sha1"]
  deployment_keys = settings.deployment.fingerprint()
  if deployment_keys:
    provenance["quantization"] = deployment_keys
  stage = run.stage("correct", "correct", fingerprint, ALIGNMENT_KEYS)
  if (stage.directory / correction_set.SIDECAR_FILE).exists():
    logging.info("Corrected set in %s is finished; loading it.", stage.directory)
    corrected = correction_set.load_corrected_set(stage.directory, provenance)
  else:
    corrected = _build_corrected_set(stage.directory, settings, base, provenance,
                                     batch_callback)
  stats = corrected.stats
  logging.info("Correction: %d misclassified, %d corrected, %d failed (success rate %.3f).",
               stats["misclassified"], stats["corrected"], stats["failed"], stats["success_rate"])
  return Correction(corrected=corrected, fingerprint=fingerprint)


def _build_corrected_set(directory: Path, settings: Settings, base: DeployedBaseline,
                         provenance: dict[str, Any], batch_callback: BatchCallback | None
                         ) -> correction_set.CorrectedSet:
  options, train = settings.correct, base.baseline.dataset.train
  images, labels = train.images, train.labels
  rows = correction_set.misclassified_indices(base.prediction, labels)
  logging.info("Correcting %d misclassified of %d training images (eps=%g).", len(rows),
               len(labels), options.eps)
  if len(rows):
    logits_fn, _ = attack_model(base.baseline.model, base.variables)
    key = jax.random.fold_in(jax.random.key(settings.seed), 1)
    result = attack_split(
        options.spec, logits_fn, base.variables, images[rows], labels[rows], eps=options.eps,
        batch_size=options.batch_size, key=key, mesh=base.mesh, out_dir=directory / "attack",
        save_adversarial=True, description="correct", batch_size_key="correct.batch_size",
        batch_callback=batch_callback)
  else:
    result = _empty_correction(options.spec, options.eps, images)
  corrected = correction_set.build_corrected_set_from_subset(images, labels, base.prediction,
                                                             result, options.on_failure)
  correction_set.save_corrected_set(directory, corrected, provenance)
  return corrected


def _read_by(variant: str, fingerprint: dict[str, Any]) -> dict[str, Any]:
  """`fingerprint` as `variant` reads it: only the aligned variant reads the alignment and
  method keys, and `corrected_ce` does not read `adapt.start` either (it never changes it)."""
  if variant == "adcorda":
    return fingerprint
  dropped = ADCORDA_ONLY_KEYS | ({"adapt.start"} if variant == "corrected_ce" else set())
  return {k: v for k, v in fingerprint.items() if k not in dropped}


def adaptation_sets(settings: Settings, original: finetune.Arrays,
                    corrected: correction_set.CorrectedSet
                    ) -> tuple[finetune.Arrays, finetune.Arrays]:
  """(labelled source, unlabelled target) of the aligned `adcorda` variant (`adapt.direction`,
  `adapt.source`): the paper's reading is (corrected set, original set)."""
  method = settings.adapt
  fixed = (corrected.images, corrected.labels)
  if method.source == "corrected_subset":
    if not len(corrected.changed):
      raise ConfigError("adapt.source='corrected_subset' needs corrected images, but stage 1 "
                        "changed none (nothing was misclassified or every correction failed); "
                        "use adapt.source='corrected_set'")
    rows = np.searchsorted(corrected.source_index, corrected.changed)
    fixed = (corrected.images[rows], corrected.labels[rows])
  return (fixed, original) if method.direction == "forward" else (original, fixed)


def adapt(run: pipeline.Run, config: ml_collections.ConfigDict, settings: Settings,
          base: DeployedBaseline, correction: Correction,
          step_callback: AdaptCallback | None) -> Adaptation:
  """Stage 2: fine-tunes each variant once per seed in `adapt/<variant>/seed<k>/`.

  With `adapt.start='corrected_ce'` the aligned run starts from that seed's `corrected_ce`
  model, so it has trained twice the steps; `same_budget_finetune` then runs twice the steps
  too, in one schedule, so the control keeps AdCorDA's budget.
  """
  baseline, corrected, deployment = base.baseline, correction.corrected, settings.deployment
  model, variables, dataset = baseline.model, baseline.variables, baseline.dataset
  options = settings.adapt.finetune
  steps_per_epoch = batches.steps_per_epoch(len(corrected.labels), options.batch_size)
  total_steps = options.epochs * steps_per_epoch
  chained = settings.adapt.start == "corrected_ce"
  fingerprint = {**correction.fingerprint,
                 "correct.arrays_sha1": tree_digest({"images": corrected.images,
                                                     "labels": corrected.labels}),
                 **config_keys(config, ("adapt",))}
  shared = dict(steps_per_epoch=steps_per_epoch, num_classes=dataset.num_classes,
                apply_fn=deployment.train_apply_fn(model),
                input_settings=input_pipeline.settings_from_config(config))
  ce_only = finetune.Finetuner(model, variables["params"], options, total_steps=total_steps,
                               **shared)
  control = (finetune.Finetuner(model, variables["params"], options,
                                total_steps=2 * total_steps, **shared) if chained else ce_only)
  aligned = finetune.Finetuner(model, variables["params"], options, total_steps=total_steps,
                               alignment=settings.adapt.alignment_loss,
                               lambda_=settings.adapt.lambda_, **shared)
  train = dataset.train
  original = (train.images, train.labels)
  source, target = adaptation_sets(settings, original, corrected)
  runs = {"corrected_ce": ((corrected.images, corrected.labels), None, ce_only),
          "same_budget_finetune": (original, None, control),
          "adcorda": (source, target, aligned)}
  refined: dict[tuple[str, int], dict[str, Any]] = {}
  trained: dict[tuple[str, int], dict[str, Any]] = {}  # Float variables, before deployment.
  for variant in FINETUNED:  # corrected_ce first: a chained adcorda run starts from it.
    source, target, runner = runs[variant]
    for seed in settings.seeds:
      stage = run.stage(Path("adapt") / variant / f"seed{seed}", "adapt", _read_by(
          variant, {**fingerprint, "variant": variant, "adapt.seed": seed}), ALIGNMENT_KEYS)
      callback = None
      if step_callback is not None:
        callback = (lambda step, _, v=variant, s=seed: step_callback(v, s, step))
      start = trained[("corrected_ce", seed)] if chained and variant == "adcorda" else variables
      result = runner.run(start, source, target, seed=seed, directory=stage.directory,
                          meta={**baseline.meta, "variant": variant, "seed": seed},
                          description=f"{variant} seed {seed}", step_callback=callback)
      trained[(variant, seed)] = result.variables
      refined[(variant, seed)] = deployment.trained(result.variables)
  return Adaptation(refined=refined, fingerprint=fingerprint, total_steps=total_steps,
                    steps_per_epoch=steps_per_epoch)


def evaluate_and_report(run: pipeline.Run, config: ml_collections.ConfigDict,
                        settings: Settings, base: DeployedBaseline, correction: Correction,
                        adaptation: Adaptation) -> dict[str, Any]:
  """Evaluates the baseline and every fine-tuned run, then writes results, report and plots."""
  baseline, dataset = base.baseline, base.baseline.dataset
  train = dataset.train
  evaluate_keys = config_keys(config, ("evaluate",))
  misclassified = correction_set.misclassified_indices(base.prediction, train.labels)
  evaluator = Evaluator.of(settings.evaluation, dataset, baseline.model,
                           jax.random.fold_in(jax.random.key(settings.seed), 2), base.mesh,
                           predict=base.predict, misclassified=misclassified,
                           retired_keys=ALIGNMENT_KEYS)
  evaluations = {"baseline": [evaluator(
      base.variables, run.path / "evaluate" / "baseline",
      {**base.fingerprint, **evaluate_keys}, "baseline")]}
  for variant in FINETUNED:
    evaluations[variant] = [
        {"seed": seed, **evaluator(
            adaptation.refined[(variant, seed)], run.path / "evaluate" / variant / f"seed{seed}",
            _read_by(variant, {**adaptation.fingerprint, "variant": variant, "adapt.seed": seed,
                               "seed": settings.seed, **evaluate_keys}), f"{variant} seed {seed}")}
        for seed in settings.seeds]

  params = baseline.variables["params"]
  summaries = {name: aggregate(runs) for name, runs in evaluations.items()}
  for summary in summaries.values():
    summary["size_bytes"] = settings.deployment.size_bytes(params)
  corrected, adapt_settings = correction.corrected, settings.adapt
  fields: AdcordaResults = {
      "dataset": dataset.name, "model": baseline.meta["model"]["name"],
      "baseline_checkpoint": str(baseline.checkpoint), "data_source": baseline.data_source,
      "num_train": len(train.labels), "num_test": len(dataset.test),
      "seeds": list(settings.seeds), "variant_order": list(VARIANTS), "variants": summaries,
      "correction": {**corrected.stats, "attack": settings.correct.spec.describe()},
      "adapt": {"steps": adaptation.total_steps, "steps_per_epoch": adaptation.steps_per_epoch,
                "steps_by_variant": _steps_by_variant(adapt_settings, adaptation.total_steps),
                "direction": adapt_settings.direction, "source": adapt_settings.source,
                "start": adapt_settings.start,
                "alignment": adapt_settings.alignment, "lambda_": adapt_settings.lambda_,
                "batch_norm": adapt_settings.finetune.batch_norm,
                "trainable": adapt_settings.finetune.trainable},
      "evaluate": settings.evaluation.summary(evaluator.robust_examples),
      "quantization": _quantization_summary(settings, params, summaries),
  }
  results = run.results(**fields)
  changed = corrected.changed[:settings.plot_examples] if settings.plot_examples else []
  plots = [lambda: adcorda_report.plot_accuracy(results, run.path / "accuracy.png")]
  if len(changed):
    plots.append(lambda: adcorda_report.plot_corrections(
        train.images[changed], _corrected_rows(corrected, changed), train.labels[changed],
        base.prediction[changed], settings.correct.eps, run.path / "corrections.png"))
  return run.finish(results, report=adcorda_report.adcorda_markdown(results),
                    summary=adcorda_report.summary_line(results), plots=plots)


def _steps_by_variant(adapt_settings: Any, steps: int) -> dict[str, int]:
  """Fine-tuning steps behind each variant, counted from the baseline."""
  chained = 2 * steps if adapt_settings.start == "corrected_ce" else steps
  return {"baseline": 0, "corrected_ce": steps, "same_budget_finetune": chained,
          "adcorda": chained}


def _quantization_summary(settings: Settings, params: Any,
                          summaries: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
  """The quantized run's settings and its variants under quantization names (`adcorda_w4`...)."""
  deployment = settings.deployment
  summary = deployment.summary(params)
  if summary is None:
    return None
  tag = deployment.tag
  names = {"baseline": f"ptq_{tag}_{deployment.granularity}", "same_budget_finetune": f"qat_{tag}",
           "corrected_ce": f"corrected_ce_{tag}", "adcorda": f"adcorda_{tag}"}
  return {**summary,
          "variants": {names[name]: {"same_as": name, "test_accuracy": entry["test_accuracy"],
                                     "test_accuracy_std": entry["test_accuracy_std"],
                                     "size_bytes": entry["size_bytes"]}
                       for name, entry in summaries.items()}}


def _corrected_rows(corrected: correction_set.CorrectedSet, original_rows: np.ndarray
                    ) -> np.ndarray:
  """The corrected images of the given ORIGINAL row indices (source_index maps the rows)."""
  positions = np.searchsorted(corrected.source_index, original_rows)
  return corrected.images[positions]

"""`task=adcorda`: AdCorDA (arXiv 2401.13212) with its controls, end to end and resumable.

    python main.py --config configs/adcorda_digits.py --workdir runs/adcorda_digits

Stages, each in its own folder of the workdir with a fingerprint (`adcorda.stages`):

1. `baseline/`: train the classifier (`task=train` on `data`/`model`/`train`), unless
   `adcorda.baseline_checkpoint` names another run's checkpoint.
2. `correct/`: the baseline's misclassified (un-augmented) training images are moved within
   `correct.eps` toward their true label by the `correct` attack; the corrected training set
   (`corrected_set.npz` + provenance/statistics) replaces them.
3. `adapt/<variant>/seed<k>/`: fine-tuning from the baseline, once per seed in `adcorda.seeds`:
   `corrected_ce` (corrected set, cross-entropy), `same_budget_finetune` (original set, same
   optimizer, schedule and steps), `adcorda` (corrected set as labelled source, original set as
   target, cross-entropy + `adapt.lambda_` * alignment of penultimate features).
4. `evaluate/<variant>/seed<k>/`: clean train/val/test accuracy and robust test accuracy under
   `evaluate.attacks` at `evaluate.eps`.

With `model.quant.weight_bits` > 0 (issue: AdCorDA on weight-quantized networks) the baseline is
the post-training-quantized network (`quant.deploy`), stage 2 attacks it, and every fine-tuning
runs with fake-quantized kernels in the loop (straight-through gradients to float weights), so
`same_budget_finetune` is the QAT control; results also list the variants under quantization
names (`ptq_w4_per_channel`, `qat_w4`, `adcorda_w4`) with model sizes.

The same command on the same workdir skips finished stages and resumes an interrupted one; a
config change that invalidates a stage is a one-line CheckpointError naming the keys.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from adcorda_jax import workdir as workdir_lib
from adcorda_jax.adcorda import correction_set, finetune, stages
from adcorda_jax.attacks.driver import BatchCallback, SplitAttackResult, attack_split
from adcorda_jax.attacks.model_fn import attack_model
from adcorda_jax.attacks.specs import AttackSpec
from adcorda_jax.errors import ConfigError
from adcorda_jax.quant.deploy import Quantization
from adcorda_jax.quant.export import model_size_bytes
from adcorda_jax.reporting import adcorda_report
from adcorda_jax.tasks import common, model_evaluation
from adcorda_jax.training import batches, checkpointing, sharding

VARIANTS = ("baseline", "corrected_ce", "same_budget_finetune", "adcorda")
FINETUNED = VARIANTS[1:]
AdaptCallback = Callable[[str, int, int], None]  # (variant, seed, step)


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


def _correct_stage(directory: Path, settings: stages.Settings, fingerprint: dict[str, Any],
                   provenance: dict[str, Any], logits_fn: Any, variables: Any,
                   images: np.ndarray, labels: np.ndarray, prediction: np.ndarray,
                   key: jax.Array, mesh: jax.sharding.Mesh,
                   batch_callback: BatchCallback | None) -> correction_set.CorrectedSet:
  """Builds (or loads) the corrected training set in `directory`."""
  stages.claim(directory, "correct", fingerprint)
  if (directory / correction_set.SIDECAR_FILE).exists():
    logging.info("Corrected set in %s is finished; loading it.", directory)
    return correction_set.load_corrected_set(directory, provenance)
  rows = correction_set.misclassified_indices(prediction, labels)
  logging.info("Correcting %d misclassified of %d training images (eps=%g).", len(rows),
               len(labels), settings.correct_eps)
  if len(rows):
    result = attack_split(
        settings.correct_spec, logits_fn, variables, images[rows], labels[rows],
        eps=settings.correct_eps, batch_size=settings.correct_batch_size, key=key, mesh=mesh,
        out_dir=directory / "attack", save_adversarial=True, description="correct",
        batch_size_key="correct.batch_size", batch_callback=batch_callback)
  else:
    result = _empty_correction(settings.correct_spec, settings.correct_eps, images)
  corrected = correction_set.build_corrected_set_from_subset(images, labels, prediction, result,
                                                             settings.on_failure)
  correction_set.save_corrected_set(directory, corrected, provenance)
  return corrected


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
  with common.open_staged_run(config, workdir) as run:
    if run.finished is not None:
      return run.finished
    return _adcorda(config, run, correct_batch_callback, adapt_step_callback)


def _adcorda(config: ml_collections.ConfigDict, run: workdir_lib.Run,
             correct_batch_callback: BatchCallback | None,
             adapt_step_callback: AdaptCallback | None) -> dict[str, Any]:
  wall_start = time.perf_counter()
  workdir = run.path
  settings = stages.read_settings(config)
  seed = config.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ConfigError(f"seed must be an integer, got {seed!r}")
  run.claim()  # Every setting is checked: work starts here.

  # --- Stage 1: baseline. ---
  baseline = common.load_baseline(config, settings.baseline_checkpoint,
                                  "adcorda.baseline_checkpoint", workdir)
  checkpoint, variables, meta = baseline.checkpoint, baseline.variables, baseline.meta
  model, dataset, base_fingerprint = baseline.model, baseline.dataset, baseline.fingerprint
  mesh = sharding.make_mesh()
  predict = model_evaluation.make_predictor(model.apply, settings.eval_batch_size, mesh)
  train_images, train_labels = dataset.train.images, dataset.train.labels
  # With model.quant the baseline is the post-training-quantized network: correction attacks it
  # and fine-tuning runs with fake quantization in the loop (straight-through to float weights).
  quant = settings.quant
  deployed = quant.ptq_variables(variables) if quant else variables
  quant_fingerprint = quant.fingerprint() if quant else {}
  if quant:
    logging.info("Quantized AdCorDA: %s kernels (%s, %s calibration).", quant.tag,
                 "per channel" if quant.spec.per_channel else "per tensor", quant.calibration)
  base_prediction = predict(deployed, train_images)

  # --- Stage 2: the corrected training set. ---
  correct_fingerprint = {**base_fingerprint, **quant_fingerprint, "seed": seed,
                         **stages.config_fingerprint(config, ("correct",))}
  # The in-workdir baseline is named relative to the workdir, so a moved workdir still resumes.
  provenance = correction_set.correction_provenance(
      checkpoint_path=str(checkpoint.relative_to(workdir) if checkpoint.is_relative_to(workdir)
                          else checkpoint), checkpoint_step=_checkpoint_step(checkpoint),
      spec=settings.correct_spec, eps=settings.correct_eps, on_failure=settings.on_failure,
      images=train_images, labels=train_labels)
  provenance["params_sha1"] = base_fingerprint["baseline.params_sha1"]
  if quant:
    provenance["quantization"] = quant_fingerprint
  logits_fn, _ = attack_model(model, deployed)
  key = jax.random.key(seed)
  corrected = _correct_stage(
      workdir / "correct", settings, correct_fingerprint, provenance, logits_fn, deployed,
      train_images, train_labels, base_prediction, jax.random.fold_in(key, 1), mesh,
      correct_batch_callback)
  stats = corrected.stats
  logging.info("Correction: %d misclassified, %d corrected, %d failed (success rate %.3f).",
               stats["misclassified"], stats["corrected"], stats["failed"], stats["success_rate"])

  # --- Stage 3: fine-tuning, per variant and seed. ---
  adapt = settings.adapt
  steps_per_epoch = batches.steps_per_epoch(len(corrected.labels), adapt.batch_size)
  total_steps = adapt.epochs * steps_per_epoch
  adapt_fingerprint = {**correct_fingerprint,
                       "correct.arrays_sha1": stages.tree_digest(
                           {"images": corrected.images, "labels": corrected.labels}),
                       **stages.config_fingerprint(config, ("adapt",))}
  shared = dict(total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                num_classes=dataset.num_classes,
                apply_fn=quant.qat_apply_fn(model) if quant else None)
  ce_only = finetune.Finetuner(model, variables["params"], adapt, with_target=False, **shared)
  aligned = finetune.Finetuner(model, variables["params"], adapt, with_target=True, **shared)
  original, fixed = (train_images, train_labels), (corrected.images, corrected.labels)
  sources = {"corrected_ce": (fixed, None, ce_only),
             "same_budget_finetune": (original, None, ce_only),
             "adcorda": (fixed, original, aligned)}
  refined: dict[tuple[str, int], dict[str, Any]] = {}

  def read_by(variant: str, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """`fingerprint` as `variant` reads it: only the aligned variant reads the alignment keys."""
    return fingerprint if sources[variant][1] is not None else stages.without_alignment(fingerprint)

  for variant in FINETUNED:
    source, target, runner = sources[variant]
    for run_seed in settings.seeds:
      directory = workdir / "adapt" / variant / f"seed{run_seed}"
      stages.claim(directory, "adapt", read_by(variant, {**adapt_fingerprint, "variant": variant,
                                                         "adapt.seed": run_seed}))
      callback = None
      if adapt_step_callback is not None:
        callback = (lambda step, _, v=variant, s=run_seed: adapt_step_callback(v, s, step))
      result = runner.run(variables, source, target, seed=run_seed, directory=directory,
                          meta={**meta, "variant": variant, "seed": run_seed},
                          description=f"{variant} seed {run_seed}", step_callback=callback)
      refined[(variant, run_seed)] = (quant.qat_variables(result.variables) if quant
                                      else result.variables)

  # --- Stage 4: evaluation. ---
  evaluate_keys = stages.config_fingerprint(config, ("evaluate",))
  evaluator = model_evaluation.Evaluator(
      dataset, model, predict, settings.eval_specs, settings.eval_eps, settings.eval_batch_size,
      settings.max_examples, jax.random.fold_in(key, 2), mesh,
      misclassified=correction_set.misclassified_indices(base_prediction, train_labels))
  evaluations = {"baseline": [evaluator(
      deployed, workdir / "evaluate" / "baseline",
      {**base_fingerprint, **quant_fingerprint, "seed": seed, **evaluate_keys}, "baseline")]}
  for variant in FINETUNED:
    evaluations[variant] = [
        {"seed": run_seed, **evaluator(
            refined[(variant, run_seed)], workdir / "evaluate" / variant / f"seed{run_seed}",
            read_by(variant, {**adapt_fingerprint, "variant": variant, "adapt.seed": run_seed,
                              "seed": seed, **evaluate_keys}), f"{variant} seed {run_seed}")}
        for run_seed in settings.seeds]

  count = evaluator.robust_examples
  summaries = {name: model_evaluation.aggregate(runs) for name, runs in evaluations.items()}
  size_bytes = (quant.size_bytes(variables["params"]) if quant
                else model_size_bytes(variables["params"]))
  for summary in summaries.values():
    summary["size_bytes"] = size_bytes
  results: dict[str, Any] = {
      "status": "complete",
      "task": config.get("task", "adcorda"),
      "dataset": dataset.name,
      "model": meta["model"]["name"],
      "baseline_checkpoint": str(checkpoint),
      "data_source": baseline.data_source,
      "num_train": len(train_labels),
      "num_test": len(dataset.test),
      "seeds": list(settings.seeds),
      "variant_order": list(VARIANTS),
      "variants": summaries,
      "correction": {**stats, "attack": settings.correct_spec.describe()},
      "adapt": {"steps": total_steps, "steps_per_epoch": steps_per_epoch,
                "alignment": adapt.alignment, "lambda_": adapt.lambda_,
                "batch_norm": adapt.batch_norm, "trainable": adapt.trainable},
      "evaluate": common.evaluation_summary(settings.evaluation, count),
      "quantization": _quantization_summary(quant, variables["params"], summaries),
      "devices": mesh.devices.size,
      "backend": jax.default_backend(),
      "wall_seconds": time.perf_counter() - wall_start,
      "config": run.config,
  }
  changed = corrected.changed[:settings.plot_examples] if settings.plot_examples else []
  plots = [lambda: adcorda_report.plot_accuracy(results, workdir / "accuracy.png")]
  if len(changed):
    plots.append(lambda: adcorda_report.plot_corrections(
        train_images[changed], _corrected_rows(corrected, changed), train_labels[changed],
        base_prediction[changed], settings.correct_eps, workdir / "corrections.png"))
  common.save_results(workdir, results, markdown=adcorda_report.adcorda_markdown(results),
                      summary=adcorda_report.summary_line(results), plots=plots)
  return results


def _quantization_summary(quant: Quantization | None, params: Any,
                          summaries: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
  """The quantized run's settings and its variants under quantization names (`adcorda_w4`...)."""
  if quant is None:
    return None
  spec = quant.spec
  granularity = "per_channel" if spec.per_channel else "per_tensor"
  names = {"baseline": f"ptq_{quant.tag}_{granularity}", "same_budget_finetune": f"qat_{quant.tag}",
           "corrected_ce": f"corrected_ce_{quant.tag}", "adcorda": f"adcorda_{quant.tag}"}
  return {
      "weight_bits": spec.bits, "per_channel": spec.per_channel, "symmetric": spec.symmetric,
      "calibration": quant.calibration, "float_size_bytes": model_size_bytes(params),
      "size_bytes": quant.size_bytes(params),
      "variants": {names[name]: {"same_as": name, "test_accuracy": summary["test_accuracy"],
                                 "test_accuracy_std": summary["test_accuracy_std"],
                                 "size_bytes": summary["size_bytes"]}
                   for name, summary in summaries.items()},
  }


def _corrected_rows(corrected: correction_set.CorrectedSet, original_rows: np.ndarray
                    ) -> np.ndarray:
  """The corrected images of the given ORIGINAL row indices (source_index maps the rows)."""
  positions = np.searchsorted(corrected.source_index, original_rows)
  return corrected.images[positions]

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

The same command on the same workdir skips finished stages and resumes an interrupted one; a
config change that invalidates a stage is a one-line CheckpointError naming the keys.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from adcorda_jax import workdir as workdir_lib
from adcorda_jax.adcorda import correction_set, finetune, stages
from adcorda_jax.attacks.driver import BatchCallback, SplitAttackResult, attack_split
from adcorda_jax.attacks.model_fn import attack_model
from adcorda_jax.attacks.specs import AttackSpec
from adcorda_jax.data import Dataset, load_dataset
from adcorda_jax.errors import CheckpointError, ConfigError
from adcorda_jax.reporting import adcorda_report
from adcorda_jax.tasks.robustness import check_data_matches, training_data
from adcorda_jax.training import batches, checkpointing, evaluation, sharding, trainer

VARIANTS = ("baseline", "corrected_ce", "same_budget_finetune", "adcorda")
FINETUNED = VARIANTS[1:]
AdaptCallback = Callable[[str, int, int], None]  # (variant, seed, step)


def _baseline(config: ml_collections.ConfigDict, settings: stages.Settings, workdir: Path
              ) -> tuple[Path, dict[str, Any]]:
  """(checkpoint path, fingerprint) of the baseline, training it first if needed."""
  if settings.baseline_checkpoint is not None:
    return settings.baseline_checkpoint, {"adcorda.baseline_checkpoint":
                                          str(settings.baseline_checkpoint)}
  directory = workdir / "baseline"
  train_config = stages.baseline_config(config)
  recorded = directory / workdir_lib.CONFIG_FILE
  if recorded.exists():
    changed = workdir_lib.config_differences(workdir_lib.read_json(recorded),
                                             workdir_lib.config_to_dict(train_config))
    if changed:
      raise CheckpointError(
          f"stage 'baseline' in {str(directory)!r} was made with a different config (differs "
          f"at: {stages.shown(changed)}); restore those values, or delete that folder (and the "
          "later stages' folders) to redo it, or use a new --workdir")
  trainer.train_and_evaluate(train_config, directory)
  return directory, {"adcorda.baseline_checkpoint": "",
                     **stages.config_fingerprint(train_config, ("seed", "data", "model", "train"))}


def _checkpoint_step(path: Path) -> int:
  step = checkpointing.checkpoint_step(path)
  return int(step if step is not None else -1)


def make_predictor(model: Any, batch_size: int, mesh: jax.sharding.Mesh
                   ) -> Callable[[Any, np.ndarray], np.ndarray]:
  """`predict(variables, images) -> int32 [N]` argmax predictions in padded, sharded batches."""
  apply = jax.jit(lambda variables, images: jnp.argmax(model.apply(variables, images), -1))

  def predict(variables: Any, images: np.ndarray) -> np.ndarray:
    variables = sharding.replicate(variables, mesh)
    dummy = np.zeros(len(images), np.int32)
    chunks = [evaluation.to_host(apply(variables, sharding.put_batch(batch, mesh)["image"]))
              for batch in batches.padded_batches(images, dummy, batch_size)]
    return np.concatenate(chunks)[:len(images)].astype(np.int32) if chunks else dummy

  return predict


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


def _std(values: list[float]) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean and sample std (ddof=1; 0 for one run) over seeds of one variant's evaluations."""
  summary: dict[str, Any] = {"runs": len(runs)}
  for key in ("test_accuracy", "train_accuracy", "val_accuracy", "misclassified_fixed"):
    values = [run[key] for run in runs if run.get(key) is not None]
    summary[key] = float(np.mean(values)) if values else None
    summary[f"{key}_std"] = _std(values) if values else None
  robust, robust_std = {}, {}
  for attack, by_eps in runs[0]["robust_accuracy"].items():
    robust[attack] = {e: float(np.mean([r["robust_accuracy"][attack][e] for r in runs]))
                      for e in by_eps}
    robust_std[attack] = {e: _std([r["robust_accuracy"][attack][e] for r in runs])
                          for e in by_eps}
  summary["robust_accuracy"], summary["robust_accuracy_std"] = robust, robust_std
  summary["per_seed"] = runs
  return summary


@dataclasses.dataclass
class _Evaluator:
  """Evaluates one model: clean accuracies and robust test accuracy, resumably per folder."""
  settings: stages.Settings
  dataset: Dataset
  model: Any
  misclassified: np.ndarray
  predict: Callable[[Any, np.ndarray], np.ndarray]
  key: jax.Array
  mesh: jax.sharding.Mesh

  def __call__(self, variables: Any, directory: Path, fingerprint: dict[str, Any],
               label: str) -> dict[str, Any]:
    fingerprint = {**fingerprint, "evaluate.params_sha1": stages.tree_digest(variables)}
    stages.claim(directory, "evaluate", fingerprint)
    done = stages.load_done(directory)
    if done is not None:
      return done
    data, settings = self.dataset, self.settings
    outputs: dict[str, Any] = {"label": label}
    train_prediction = None
    for name in ("train", "val", "test"):
      split = getattr(data, name)
      prediction = self.predict(variables, split.images) if len(split) else None
      outputs[f"{name}_accuracy"] = (float(np.mean(prediction == split.labels))
                                     if prediction is not None else None)
      train_prediction = prediction if name == "train" else train_prediction
    rows = self.misclassified  # The baseline's training errors: how many does this model fix?
    outputs["misclassified_fixed"] = (
        float(np.mean(train_prediction[rows] == data.train.labels[rows])) if len(rows) else None)
    count = len(data.test) if settings.max_examples == 0 else min(settings.max_examples,
                                                                 len(data.test))
    images, labels = data.test.images[:count], data.test.labels[:count]
    logits_fn, params = attack_model(self.model, variables)
    robust: dict[str, dict[str, float]] = {}
    for spec in settings.eval_specs:
      for eps in settings.eval_eps:
        result = attack_split(
            spec, logits_fn, params, images, labels, eps=eps, batch_size=settings.eval_batch_size,
            key=self.key, mesh=self.mesh,
            out_dir=directory / f"{spec.name}_{spec.norm}_eps{adcorda_report.eps_dir_tag(eps)}",
            description=f"{label} {spec.name} eps={adcorda_report.eps_label(eps)}",
            batch_size_key="evaluate.batch_size")
        robust.setdefault(spec.name, {})[adcorda_report.eps_key(eps)] = result.robust_accuracy
    outputs["robust_accuracy"] = robust
    outputs["robust_examples"] = count
    stages.mark_done(directory, outputs)
    return outputs


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
  wall_start = time.perf_counter()
  workdir = workdir_lib.prepare(workdir)
  settings = stages.read_settings(config)
  finished = workdir_lib.finished_results(workdir)
  current = workdir_lib.config_to_dict(config)
  if finished is not None and not workdir_lib.config_differences(
      finished.get("config", {}), current, ignore=stages.RESUMABLE_KEYS):
    logging.info("Run in %s already finished; returning its saved results.", workdir)
    return finished
  seed = config.get("seed", 0)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ConfigError(f"seed must be an integer, got {seed!r}")

  # --- Stage 1: baseline. ---
  checkpoint, base_fingerprint = _baseline(config, settings, workdir)
  variables, meta = checkpointing.load_checkpoint(checkpoint)
  model = checkpointing.model_from_meta(meta)
  data_config, data_seed, data_source = training_data(checkpoint, meta, "")
  dataset = load_dataset(data_config, data_seed)
  check_data_matches(dataset, meta, checkpoint)
  base_fingerprint["baseline.params_sha1"] = stages.tree_digest(variables)
  mesh = sharding.make_mesh()
  predict = make_predictor(model, settings.eval_batch_size, mesh)
  train_images, train_labels = dataset.train.images, dataset.train.labels
  base_prediction = predict(variables, train_images)

  # --- Stage 2: the corrected training set. ---
  correct_fingerprint = {**base_fingerprint, "seed": seed,
                         **stages.config_fingerprint(config, ("correct",))}
  # The in-workdir baseline is named relative to the workdir, so a moved workdir still resumes.
  provenance = correction_set.correction_provenance(
      checkpoint_path=str(checkpoint.relative_to(workdir) if checkpoint.is_relative_to(workdir)
                          else checkpoint), checkpoint_step=_checkpoint_step(checkpoint),
      spec=settings.correct_spec, eps=settings.correct_eps, on_failure=settings.on_failure,
      images=train_images, labels=train_labels)
  provenance["params_sha1"] = base_fingerprint["baseline.params_sha1"]
  logits_fn, _ = attack_model(model, variables)
  key = jax.random.key(seed)
  corrected = _correct_stage(
      workdir / "correct", settings, correct_fingerprint, provenance, logits_fn, variables,
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
  common = dict(total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                num_classes=dataset.num_classes)
  ce_only = finetune.Finetuner(model, variables["params"], adapt, with_target=False, **common)
  aligned = finetune.Finetuner(model, variables["params"], adapt, with_target=True, **common)
  original, fixed = (train_images, train_labels), (corrected.images, corrected.labels)
  sources = {"corrected_ce": (fixed, None, ce_only),
             "same_budget_finetune": (original, None, ce_only),
             "adcorda": (fixed, original, aligned)}
  refined: dict[tuple[str, int], dict[str, Any]] = {}
  for variant in FINETUNED:
    source, target, runner = sources[variant]
    for run_seed in settings.seeds:
      directory = workdir / "adapt" / variant / f"seed{run_seed}"
      stages.claim(directory, "adapt", {**adapt_fingerprint, "variant": variant,
                                        "adapt.seed": run_seed})
      callback = None
      if adapt_step_callback is not None:
        callback = (lambda step, _, v=variant, s=run_seed: adapt_step_callback(v, s, step))
      result = runner.run(variables, source, target, seed=run_seed, directory=directory,
                          meta={**meta, "variant": variant, "seed": run_seed},
                          description=f"{variant} seed {run_seed}", step_callback=callback)
      refined[(variant, run_seed)] = result.variables

  # --- Stage 4: evaluation. ---
  evaluate_keys = stages.config_fingerprint(config, ("evaluate",))
  evaluator = _Evaluator(settings, dataset, model,
                         correction_set.misclassified_indices(base_prediction, train_labels),
                         predict, jax.random.fold_in(key, 2), mesh)
  evaluations = {"baseline": [evaluator(variables, workdir / "evaluate" / "baseline",
                                        {**base_fingerprint, "seed": seed, **evaluate_keys},
                                        "baseline")]}
  for variant in FINETUNED:
    evaluations[variant] = [
        {"seed": run_seed, **evaluator(
            refined[(variant, run_seed)], workdir / "evaluate" / variant / f"seed{run_seed}",
            {**adapt_fingerprint, "variant": variant, "adapt.seed": run_seed, "seed": seed,
             **evaluate_keys}, f"{variant} seed {run_seed}")}
        for run_seed in settings.seeds]

  count = len(dataset.test) if settings.max_examples == 0 else min(settings.max_examples,
                                                                   len(dataset.test))
  results: dict[str, Any] = {
      "status": "complete",
      "task": config.get("task", "adcorda"),
      "dataset": dataset.name,
      "model": meta["model"]["name"],
      "baseline_checkpoint": str(checkpoint),
      "data_source": data_source,
      "num_train": len(train_labels),
      "num_test": len(dataset.test),
      "seeds": list(settings.seeds),
      "variant_order": list(VARIANTS),
      "variants": {name: aggregate(runs) for name, runs in evaluations.items()},
      "correction": {**stats, "attack": settings.correct_spec.describe()},
      "adapt": {"steps": total_steps, "steps_per_epoch": steps_per_epoch,
                "alignment": adapt.alignment, "lambda_": adapt.lambda_,
                "batch_norm": adapt.batch_norm, "trainable": adapt.trainable},
      "evaluate": {"attacks": [s.name for s in settings.eval_specs],
                   "attack_descriptions": {s.name: s.describe() for s in settings.eval_specs},
                   "norm": settings.eval_specs[0].norm, "eps": list(settings.eval_eps),
                   "robust_examples": count},
      "devices": mesh.devices.size,
      "backend": jax.default_backend(),
      "wall_seconds": time.perf_counter() - wall_start,
      "config": current,
  }
  if workdir_lib.is_writer():
    changed = corrected.changed[:settings.plot_examples] if settings.plot_examples else []
    if len(changed):
      adcorda_report.plot_corrections(
          train_images[changed], _corrected_rows(corrected, changed), train_labels[changed],
          base_prediction[changed], settings.correct_eps, workdir / "corrections.png")
    adcorda_report.plot_accuracy(results, workdir / "accuracy.png")
    workdir_lib.write_text_atomic(workdir / "report.md", adcorda_report.adcorda_markdown(results))
  workdir_lib.write_json_atomic(workdir / workdir_lib.CONFIG_FILE, current)
  workdir_lib.write_json_atomic(workdir / workdir_lib.RESULTS_FILE, results)
  logging.info("Done: %s; results in %s", adcorda_report.summary_line(results),
               workdir / workdir_lib.RESULTS_FILE)
  return results


def _corrected_rows(corrected: correction_set.CorrectedSet, original_rows: np.ndarray
                    ) -> np.ndarray:
  """The corrected images of the given ORIGINAL row indices (source_index maps the rows)."""
  positions = np.searchsorted(corrected.source_index, original_rows)
  return corrected.images[positions]

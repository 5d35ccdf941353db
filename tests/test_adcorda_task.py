"""`task=adcorda` end to end on digits: artifacts, the corrected set, resuming interrupted stages,
stage fingerprints, finished runs, config errors, and the stage-2 fine-tuning step."""
from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from adcorda_jax import tasks
from adcorda_jax.adcorda import correction_set
from adcorda_jax.adcorda import settings as adcorda_settings
from adcorda_jax.data.dataset import Split
from adcorda_jax.training import finetune
from adcorda_jax.training.baseline import Baseline
from adcorda_jax.data import load_dataset
from adcorda_jax.errors import CheckpointError, ConfigError
from adcorda_jax.tasks import adcorda
from adcorda_jax.training import checkpointing, sharding
from configs import adcorda_digits
from tests.helpers import one_line, override

SEEDS = (0, 1)


def tiny_config(**overrides):
  """configs/adcorda_digits.py cut down: 2 seeds, 1 fine-tuning epoch, short attacks."""
  config = adcorda_digits.get_config()
  config.adcorda.seeds = SEEDS
  config.adcorda.plot_examples = 4
  config.correct.steps = 10
  config.correct.batch_size = 32          # ~78 misclassified digits: 3 batches.
  config.adapt.epochs = 1
  config.adapt.checkpoint_every_steps = 8
  config.adapt.log_every_steps = 8
  config.evaluate.max_examples = 64
  config.evaluate.batch_size = 32
  config.evaluate.pgd.steps = 3
  config.evaluate.apgd.steps = 3
  return override(config, **overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("adcorda")
  return workdir, adcorda.run_adcorda(tiny_config(), workdir)


@pytest.mark.slow
def test_run_writes_results_report_and_plots(finished):
  workdir, results = finished
  for name in ("results.json", "report.md", "accuracy.png", "corrections.png", "config.json",
               "baseline/results.json", "correct/corrected_set.npz"):
    assert (workdir / name).exists(), name
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  assert set(saved["variants"]) == set(adcorda.VARIANTS) == set(saved["variant_order"])
  for name, variant in saved["variants"].items():
    for key in ("test_accuracy", "test_accuracy_std", "train_accuracy", "robust_accuracy"):
      assert variant[key] is not None, (name, key)
    assert set(variant["robust_accuracy"]) == {"pgd", "apgd_ce"}
    assert list(variant["robust_accuracy"]["pgd"]) == ["0.05"]
    assert variant["runs"] == (1 if name == "baseline" else len(SEEDS))
    assert 0.5 < variant["test_accuracy"] <= 1
  per_seed = saved["variants"]["adcorda"]["per_seed"]
  accuracies = [run["test_accuracy"] for run in per_seed]
  assert [run["seed"] for run in per_seed] == list(SEEDS)
  assert saved["variants"]["adcorda"]["test_accuracy"] == pytest.approx(np.mean(accuracies))
  assert saved["variants"]["adcorda"]["test_accuracy_std"] == pytest.approx(
      np.std(accuracies, ddof=1))
  correction = saved["correction"]
  assert {"misclassified", "corrected", "failed", "success_rate"} <= set(correction)
  assert correction["misclassified"] > 32 and correction["corrected"] > 0  # > 1 attack batch.
  assert correction["corrected"] + correction["failed"] == correction["misclassified"]
  assert saved["adapt"]["steps"] == 21  # 1 epoch of 1294 digits in batches of 64.
  report = (workdir / "report.md").read_text()
  assert "| same_budget_finetune |" in report and "## Correction" in report
  assert f"| {correction['misclassified']} | {correction['corrected']} |" in report


@pytest.mark.slow
def test_corrected_set_changes_only_misclassified_rows_within_eps(finished):
  workdir, results = finished
  config = tiny_config()
  dataset = load_dataset(config.data, config.seed)
  variables, meta = checkpointing.load_checkpoint(workdir / "baseline")
  logits = checkpointing.model_from_meta(meta).apply(variables, dataset.train.images)
  wrong = np.flatnonzero(np.argmax(np.asarray(logits), -1) != dataset.train.labels)
  with np.load(workdir / "correct" / correction_set.ARRAYS_FILE) as arrays:
    images, labels, changed = arrays["images"], arrays["labels"], arrays["changed"]
  assert images.shape == dataset.train.images.shape  # keep_original: nothing dropped.
  np.testing.assert_array_equal(labels, dataset.train.labels)
  differs = np.flatnonzero(np.any(images != dataset.train.images, axis=(1, 2, 3)))
  assert set(differs) <= set(changed) <= set(wrong)
  assert len(changed) == results["correction"]["corrected"] == results["correction"]["replaced"]
  assert np.abs(images - dataset.train.images).max() <= config.correct.eps + 1e-6
  fixed = np.argmax(np.asarray(checkpointing.model_from_meta(meta).apply(
      variables, images[changed])), -1)
  np.testing.assert_array_equal(fixed, labels[changed])


@pytest.mark.slow
def test_rerun_returns_saved_results_without_work(finished):
  workdir, results = finished
  calls = []
  config = tiny_config(**{"adapt.log_every_steps": 4})  # A cadence-only change: still finished.
  again = tasks.run_task(config, workdir)
  again_cb = adcorda.run_adcorda(tiny_config(), workdir, correct_batch_callback=calls.append,
                                 adapt_step_callback=lambda *a: calls.append(a))
  assert calls == [] and again == again_cb == json.loads(json.dumps(results))


class _Stop(Exception):
  """Raised from a callback to simulate a killed run."""


@pytest.mark.slow
def test_interrupted_correct_and_adapt_resume_to_the_same_numbers(finished, tmp_path):
  _, reference = finished

  def stop_correct(index):
    if index == 1:
      raise _Stop

  with pytest.raises(_Stop):
    adcorda.run_adcorda(tiny_config(), tmp_path, correct_batch_callback=stop_correct)
  batches, steps = [], []

  def stop_adapt(variant, seed, step):
    steps.append((variant, seed, step))
    if (variant, seed, step) == ("adcorda", 1, 12):  # Checkpoint at step 8.
      raise _Stop

  with pytest.raises(_Stop):
    adcorda.run_adcorda(tiny_config(), tmp_path, correct_batch_callback=batches.append,
                        adapt_step_callback=stop_adapt)
  assert batches == [2]  # Batches 0 and 1 of the correction were loaded, not recomputed.
  steps.clear()
  resumed = adcorda.run_adcorda(tiny_config(), tmp_path,
                                adapt_step_callback=lambda *a: steps.append(a))
  assert steps == [("adcorda", 1, step) for step in range(9, 22)]
  assert resumed["correction"] == reference["correction"]
  for name, variant in reference["variants"].items():
    for run, again in zip(variant["per_seed"], resumed["variants"][name]["per_seed"],
                          strict=True):
      assert run == again, name


@pytest.mark.slow
@pytest.mark.parametrize("key, value, stage, expected", [
    ("train.epochs", 2, "baseline", "train.epochs"),
    ("correct.eps", 0.2, "correct", "correct.eps"),
    ("adapt.lambda_", 5.0, "adapt", "adapt.lambda_"),
    ("evaluate.eps", (0.05, 0.1), "evaluate", "evaluate.eps"),
])
def test_config_change_that_invalidates_a_stage_is_named(finished, tmp_path, key, value, stage,
                                                         expected):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  with pytest.raises(CheckpointError) as error:
    adcorda.run_adcorda(tiny_config(**{key: value}), workdir)
  message = one_line(error)
  assert f"stage {stage!r}" in message, message
  assert "differs at: " + expected in message  # The config key, not a digest.


@pytest.mark.slow
def test_changing_lambda_redoes_only_the_runs_that_read_it(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  for stage in ("adapt", "evaluate"):  # What the message above says to delete.
    shutil.rmtree(workdir / stage / "adcorda")
  steps = []
  results = adcorda.run_adcorda(tiny_config(**{"adapt.lambda_": 5.0}), workdir,
                                adapt_step_callback=lambda *a: steps.append(a))
  assert steps and {variant for variant, _, _ in steps} == {"adcorda"}
  for control in ("corrected_ce", "same_budget_finetune"):
    assert results["variants"][control] == finished[1]["variants"][control]


@pytest.mark.slow
def test_external_baseline_checkpoint_and_changed_provenance(finished, tmp_path):
  workdir, reference = finished
  config = tiny_config(**{"adcorda.baseline_checkpoint": str(workdir / "baseline")})
  shutil.copytree(workdir / "correct", tmp_path / "correct")  # Made from the in-workdir baseline.
  with pytest.raises(CheckpointError) as error:
    adcorda.run_adcorda(config, tmp_path)
  assert "adcorda.baseline_checkpoint" in one_line(error)


@pytest.mark.parametrize("key, value, expected", [
    ("adcorda.seeds", (), "adcorda.seeds must be a non-empty tuple"),
    ("adcorda.seeds", (0, 0), "adcorda.seeds"),
    ("correct.eps", 0.0, "correct.eps must be > 0"),
    ("correct.on_failure", "discard", "correct.on_failure='discard' is not valid"),
    ("correct.steps", 0, "correct.steps must be an integer > 0"),
    ("adapt.alignment", "cora", "adapt.alignment='cora' is not valid"),
    ("adapt.batch_norm", "fixed", "adapt.batch_norm='fixed' is not valid"),
    ("adapt.learning_rate", 0.0, "adapt.learning_rate must be > 0"),
    ("adapt.optimizer", "lion", "adapt.optimizer='lion' is not valid"),
    ("adapt.lambda_", -1.0, "adapt.lambda_ must be >= 0"),
    ("adapt.trainable", "conv[", "adapt.trainable='conv[' is not a valid regular expression"),
    ("adapt.epochs", 0, "adapt.epochs must be an integer > 0"),
    ("evaluate.attacks", "pgd,correct", "unknown attack 'correct' (evaluate.attacks)"),
    ("evaluate.eps", (), "evaluate.eps"),
])
def test_bad_config_values_name_their_key(tmp_path, key, value, expected):
  with pytest.raises(ConfigError) as error:
    tasks.run_task(tiny_config(**{key: value}), tmp_path)
  assert expected in one_line(error)
  assert not (tmp_path / "baseline").exists()  # Checked before any work.


@pytest.mark.slow
def test_finetune_frozen_batch_norm_and_trainable_mask(finished, tmp_path):
  workdir, _ = finished
  variables, meta = checkpointing.load_checkpoint(workdir / "baseline")
  model = checkpointing.model_from_meta(meta)
  dataset = load_dataset(tiny_config().data, 0)
  source = (dataset.train.images[:128], dataset.train.labels[:128])
  target = (dataset.train.images[128:256], dataset.train.labels[128:256])
  config = tiny_config(**{"adapt.batch_norm": "frozen", "adapt.trainable": "^classifier/",
                          "adapt.lambda_": 10.0})
  settings = adcorda_settings.read_adaptation(config)
  runner = finetune.Finetuner(model, variables["params"], settings.finetune, total_steps=3,
                              steps_per_epoch=2, num_classes=10,
                              alignment=settings.alignment_loss, lambda_=settings.lambda_)
  result = runner.run(variables, source, target, seed=0, directory=tmp_path, meta=meta)
  paths = jax.tree_util.tree_flatten_with_path(variables)[0]
  new = jax.tree.leaves(result.variables)
  for (path, old), value in zip(paths, new, strict=True):
    same = np.array_equal(np.asarray(old), np.asarray(value))
    assert same == ("classifier" not in jax.tree_util.keystr(path)), path
  assert result.final_metrics["alignment"] > 0
  # The two batch streams of one seed are different orders.
  assert finetune.stream_seed(0, finetune.SOURCE_STREAM) != finetune.stream_seed(
      0, finetune.TARGET_STREAM)


@pytest.mark.slow
def test_nothing_misclassified_gives_the_original_set(finished, tmp_path):
  """A baseline that is right on every training image: the set is unchanged, the stats say so."""
  workdir, _ = finished
  config = tiny_config()
  settings = adcorda_settings.read_settings(config)
  variables, meta = checkpointing.load_checkpoint(workdir / "baseline")
  dataset = load_dataset(config.data, config.seed)
  images, labels = dataset.train.images[:40], dataset.train.labels[:40]
  baseline = Baseline(checkpoint=workdir / "baseline", variables=variables, meta=meta,
                      model=checkpointing.model_from_meta(meta),
                      dataset=dataclasses.replace(dataset, train=Split(images, labels)),
                      data_source="", fingerprint={})
  base = adcorda.DeployedBaseline(baseline=baseline, variables=variables,
                                  prediction=labels.copy(), fingerprint={}, predict=None,
                                  mesh=sharding.make_mesh())
  corrected = adcorda._build_corrected_set(  # pylint: disable=protected-access
      tmp_path, settings, base, {"test": 1}, batch_callback=None)
  np.testing.assert_array_equal(corrected.images, images)
  assert corrected.stats["misclassified"] == 0 and corrected.stats["success_rate"] == 1.0
  assert correction_set.load_corrected_set(tmp_path, {"test": 1}).stats == json.loads(
      json.dumps(corrected.stats))


# Readings of the method (adapt.direction / source / start): config values of the adcorda variant.

def _corrected(changed=(1, 3)):
  images = np.arange(5 * 4, dtype=np.float32).reshape(5, 2, 2, 1) / 20
  labels = np.arange(5, dtype=np.int32)
  fixed = images.copy()
  fixed[list(changed)] += 0.01
  return correction_set.CorrectedSet(images=fixed, labels=labels,
                                     changed=np.asarray(changed, np.int64),
                                     source_index=np.arange(5), stats={})


@pytest.mark.parametrize("direction, source", [("forward", "corrected_set"),
                                               ("reverse", "corrected_set"),
                                               ("forward", "corrected_subset"),
                                               ("reverse", "corrected_subset")])
def test_adaptation_sets_follow_direction_and_source(direction, source):
  corrected = _corrected()
  original = (corrected.images - 0.01 * np.isin(np.arange(5), corrected.changed)[:, None, None,
                                                                                   None],
              corrected.labels)
  settings = adcorda_settings.read_settings(tiny_config(**{"adapt.direction": direction,
                                                           "adapt.source": source}))
  labelled, aligned = adcorda.adaptation_sets(settings, original, corrected)
  rows = [1, 3] if source == "corrected_subset" else list(range(5))
  fixed = (corrected.images[rows], corrected.labels[rows])
  expected = (fixed, original) if direction == "forward" else (original, fixed)
  for got, want in zip((labelled, aligned), expected, strict=True):
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_corrected_subset_without_corrections_is_a_config_error():
  settings = adcorda_settings.read_settings(tiny_config(**{"adapt.source": "corrected_subset"}))
  corrected = _corrected(changed=())
  with pytest.raises(ConfigError) as error:
    adcorda.adaptation_sets(settings, (corrected.images, corrected.labels), corrected)
  assert "adapt.source='corrected_subset'" in one_line(error)


@pytest.mark.parametrize("key, value", [("adapt.direction", "backward"),
                                        ("adapt.source", "subset"), ("adapt.start", "ce")])
def test_bad_method_values_name_their_key(tmp_path, key, value):
  with pytest.raises(ConfigError) as error:
    tasks.run_task(tiny_config(**{key: value}), tmp_path)
  assert f"{key}={value!r} is not valid" in one_line(error)
  assert not (tmp_path / "baseline").exists()


def _strip_method_keys(workdir):
  """Rewrites every record in `workdir` as a release without the method keys wrote it."""
  for path in workdir.rglob("*.json"):
    record = json.loads(path.read_text())
    if isinstance(record, dict):
      for key in ("adapt.direction", "adapt.source", "adapt.start"):
        record.pop(key, None)
      for section in (record.get("config", {}).get("adapt"),
                      record.get("adapt") if path.name == "config.json" else None):
        for key in ("direction", "source", "start"):
          if isinstance(section, dict):
            section.pop(key, None)
      path.write_text(json.dumps(record))


@pytest.mark.slow
def test_runs_saved_before_the_method_keys_still_resume(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  _strip_method_keys(workdir)
  (workdir / "results.json").unlink()  # Re-evaluate through every stage's fingerprint check.
  steps = []
  again = adcorda.run_adcorda(tiny_config(), workdir, adapt_step_callback=lambda *a:
                              steps.append(a))
  assert steps == []
  for name, variant in finished[1]["variants"].items():
    assert again["variants"][name]["per_seed"] == variant["per_seed"], name


@pytest.mark.slow
def test_reverse_direction_redoes_only_the_aligned_runs(finished, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  with pytest.raises(CheckpointError) as error:
    adcorda.run_adcorda(tiny_config(**{"adapt.direction": "reverse"}), workdir)
  assert "differs at: adapt.direction" in one_line(error)
  for stage in ("adapt", "evaluate"):
    shutil.rmtree(workdir / stage / "adcorda")
  steps = []
  results = adcorda.run_adcorda(tiny_config(**{"adapt.direction": "reverse"}), workdir,
                                adapt_step_callback=lambda *a: steps.append(a))
  assert steps and {variant for variant, _, _ in steps} == {"adcorda"}
  assert results["adapt"]["direction"] == "reverse"
  assert results["variants"]["adcorda"] != finished[1]["variants"]["adcorda"]
  assert "labelled source = original set" in (workdir / "report.md").read_text()


@pytest.mark.slow
def test_start_from_corrected_ce_chains_and_doubles_the_control(finished, tmp_path, monkeypatch):
  """adcorda starts from that seed's corrected_ce model; same_budget_finetune trains 2x."""
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  for stage in ("adapt", "evaluate"):
    for variant in ("adcorda", "same_budget_finetune"):
      shutil.rmtree(workdir / stage / variant)
  calls = []
  real_run = finetune.Finetuner.run

  def recording_run(self, variables, *args, description, **kwargs):
    result = real_run(self, variables, *args, description=description, **kwargs)
    calls.append((description, self.total_steps, variables, result.variables))
    return result

  monkeypatch.setattr(finetune.Finetuner, "run", recording_run)
  results = adcorda.run_adcorda(tiny_config(**{"adapt.start": "corrected_ce"}), workdir)
  by_name = {description: rest for description, *rest in calls}
  for seed in SEEDS:
    ce_steps, _, ce_final = by_name[f"corrected_ce seed {seed}"]
    steps, start, _ = by_name[f"adcorda seed {seed}"]
    assert steps == ce_steps == 21
    chex_equal = jax.tree.map(np.array_equal, start, ce_final)
    assert all(jax.tree.leaves(chex_equal)), seed
    assert by_name[f"same_budget_finetune seed {seed}"][0] == 42
  assert results["adapt"]["steps_by_variant"] == {
      "baseline": 0, "corrected_ce": 21, "same_budget_finetune": 42, "adcorda": 42}
  assert results["variants"]["corrected_ce"] == finished[1]["variants"]["corrected_ce"]

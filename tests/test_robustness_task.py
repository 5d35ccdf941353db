"""`task=robustness` end to end on a tiny trained digits checkpoint: artifacts, eps=0, resume,
finished runs, config errors and the command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adcorda_jax.data import load_dataset
from adcorda_jax.errors import CheckpointError, ConfigError
from adcorda_jax.reporting import robustness_report
from adcorda_jax.tasks import robustness
from adcorda_jax.training import checkpointing
from configs import robustness as robustness_config, tiny
from tests.helpers import one_line

REPO = Path(__file__).resolve().parents[1]
EPS = (0.0, 8 / 255, 0.15)


@pytest.fixture(scope="module")
def checkpoint(tiny_baseline) -> Path:
  """A tiny small_cnn trained for 2 epochs on 256 digits (the session's read-only workdir)."""
  return tiny_baseline.workdir


def _config(checkpoint, /, **overrides):
  config = robustness_config.get_config()
  section = config.robustness
  section.checkpoint = str(checkpoint)
  section.eps = EPS
  section.max_examples = 80        # Batches of 32: the last one padded.
  section.batch_size = 32
  section.pgd.steps = 4
  section.apgd.steps = 4
  section.update(overrides)
  return config


@pytest.fixture(scope="module")
def finished(checkpoint, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("robustness")
  return workdir, robustness.run_robustness(_config(checkpoint), workdir)


@pytest.mark.slow
def test_run_reports_clean_and_robust_accuracy_with_artifacts(checkpoint, finished):
  workdir, results = finished
  for name in ("results.json", "report.md", "robustness.png", "config.json"):
    assert (workdir / name).exists(), name
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  assert (saved["dataset"], saved["model"], saved["split"]) == ("digits", "small_cnn", "test")
  assert saved["num_examples"] == 80 and "training run's" in saved["data_source"]
  # The clean accuracy is the model's on the first 80 test digits of the training run's split.
  variables, meta = checkpointing.load_checkpoint(checkpoint)
  dataset = load_dataset(tiny.get_config().data, seed=0)
  logits = checkpointing.model_from_meta(meta).apply(variables, dataset.test.images[:80])
  clean = float(np.mean(np.argmax(np.asarray(logits), -1) == dataset.test.labels[:80]))
  assert saved["clean_accuracy"] == clean > 0.5
  keys = [robustness_report.eps_key(e) for e in EPS]
  assert saved["attacks"] == ["pgd", "apgd_ce"] == sorted(saved["robust_accuracy"], reverse=True)
  for attack, by_eps in saved["robust_accuracy"].items():
    assert set(by_eps) == set(keys)
    assert by_eps[keys[0]] == clean, attack  # eps = 0 leaves every input as it is.
    assert by_eps[keys[-1]] < clean, attack  # A deterministic run (fixed seeds) that breaks some.
  for key in keys:  # Per example, "every attack failed" is at most any one attack's rate.
    assert saved["worst_case_accuracy"][key] <= min(
        by_eps[key] for by_eps in saved["robust_accuracy"].values())
  assert len(saved["records"]) == 6
  assert {"attack", "norm", "eps", "robust_accuracy", "mean_perturbation_norm", "mean_steps",
          "seconds"} <= set(saved["records"][0])
  assert saved["config"]["robustness"]["attacks"] == "pgd,apgd_ce"
  # AutoAttack's sanity checks on a plain float CNN: computed, and quiet.
  assert saved["flags"]["checked_examples"] == 80 and saved["flags"]["warnings"] == []
  assert not saved["flags"]["probability_outputs"] and not saved["flags"]["randomized"]
  report = (workdir / "report.md").read_text()
  assert "| eps | pgd | apgd_ce | all attacks |" in report
  assert "Sanity checks (on 80 points)" in report
  assert "| 8/255 (0.0314) |" in report and "| 0.15 |" in report
  arrays = np.load(workdir / "attacks" / "pgd_linf_eps8_255" / "arrays.npz")
  assert arrays["success"].shape == (80,) and "adversarial" not in arrays.files


@pytest.mark.slow
def test_rerun_returns_the_saved_results_without_attacking(checkpoint, finished):
  workdir, results = finished
  calls = []
  again = robustness.run_robustness(_config(checkpoint), workdir, batch_callback=calls.append)
  assert calls == [] and again == json.loads(json.dumps(results))


class _Stop(Exception):
  """Raised from the batch callback to simulate a killed run."""


@pytest.mark.slow
def test_interrupted_run_resumes_at_the_first_unfinished_batch(checkpoint, finished, tmp_path):
  config = _config(checkpoint, attacks="pgd", eps=(0.15,))

  def stop(index):
    if index == 1:
      raise _Stop

  with pytest.raises(_Stop):
    robustness.run_robustness(config, tmp_path, batch_callback=stop)
  calls = []
  resumed = robustness.run_robustness(config, tmp_path, batch_callback=calls.append)
  assert calls == [2] and resumed["records"][0]["resumed_batches"] == 2
  key = robustness_report.eps_key(0.15)
  assert resumed["robust_accuracy"]["pgd"][key] == finished[1]["robust_accuracy"]["pgd"][key]


@pytest.mark.parametrize("overrides, message", [
    (dict(checkpoint=""), "robustness.checkpoint must name a training run's workdir"),
    (dict(attacks="pgd,cw"), "unknown attack 'cw' (robustness.attacks); valid names: fgsm, pgd, "
                             "apgd_ce, apgd_dlr, apgd_t, fab_t, square, autoattack"),
    (dict(eps=(0.0, -0.1)), "robustness.eps must be a finite number >= 0, got -0.1"),
    (dict(split="holdout"), "robustness.split='holdout' is not valid; choose one of: test, val, "
                            "train"),
])
def test_bad_config_is_a_one_line_error(tmp_path, overrides, message):
  with pytest.raises(ConfigError) as error:
    robustness.run_robustness(_config("unused", **overrides), tmp_path)
  assert message in one_line(error)


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
  with pytest.raises(CheckpointError) as error:
    robustness.run_robustness(_config(tmp_path / "nowhere"), tmp_path / "run")
  assert "does not exist" in one_line(error)


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_runs_from_a_step_folder(checkpoint, tmp_path):
  step_dir = max((checkpoint / "checkpoints").iterdir(), key=lambda p: int(p.name))
  out = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/robustness.py", "--workdir", str(tmp_path),
       f"--config.robustness.checkpoint={step_dir}", "--config.robustness.attacks=fgsm",
       "--config.robustness.eps=(0.0,0.1)", "--config.robustness.max_examples=40",
       "--config.robustness.batch_size=40"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["task"] == "robustness" and results["num_examples"] == 40
  assert results["robust_accuracy"]["fgsm"]["0"] == results["clean_accuracy"]
  assert 0 <= results["robust_accuracy"]["fgsm"]["0.1"] <= results["clean_accuracy"]

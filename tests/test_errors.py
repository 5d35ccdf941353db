"""Every bad input gives a one-line error naming the config key or path, and loses nothing."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from adcorda_jax import tasks
from adcorda_jax.errors import AdcordaError, CheckpointError, ConfigError, TrainingError
from adcorda_jax.training import checkpointing, trainer
from configs import tiny
from tests.helpers import one_line



@pytest.mark.parametrize("key, value, expected", [
    ("task", "trian",
     "unknown task 'trian' (task); valid names: adcorda, benchmark_attack, benchmark_train, "
     "compression_study, quantize, robustness, sweep, train"),
    ("model.name", "resnet7", "model.name"),
    ("data.name", "no_such_dataset", "data.name"),
    ("train.batch_size", 0, "train.batch_size must be an integer > 0, got 0"),
    ("train.epochs", -1, "train.epochs must be an integer > 0, got -1"),
    ("train.learning_rate", -0.1, "train.learning_rate must be > 0, got -0.1"),
    ("train.learning_rate", float("nan"), "train.learning_rate must be a finite number"),
    ("train.optimizer", "lion", "train.optimizer='lion' is not valid; choose one of: sgd, adamw"),
    ("train.schedule", "linear", "train.schedule"),
    ("train.label_smoothing", 1.5, "train.label_smoothing must be in [0, 1)"),
    ("model.width", 0.0, "model.width"),
])
def test_bad_config_values_name_their_key(tmp_path, key, value, expected):
  config = tiny.get_config()
  section, _, field = key.rpartition(".")
  (config[section] if section else config)[field] = value
  with pytest.raises(ConfigError) as error:
    tasks.run_task(config, tmp_path)
  assert expected in one_line(error)


def test_unknown_model_lists_valid_names(tmp_path):
  config = tiny.get_config()
  config.model.name = "resnet7"
  with pytest.raises(ConfigError) as error:
    tasks.run_task(config, tmp_path)
  assert "resnet20" in one_line(error) and "small_cnn" in str(error.value)


def test_workdir_under_a_file_is_named(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(CheckpointError) as error:
    tasks.run_task(tiny.get_config(), blocker / "run")
  assert str(blocker / "run") in one_line(error)
  assert f"{str(blocker)!r} is a file, not a directory" in str(error.value)


def test_workdir_that_is_a_file_is_named(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(CheckpointError) as error:
    tasks.run_task(tiny.get_config(), blocker)
  assert one_line(error) == f"workdir {str(blocker)!r} is a file, not a directory"


@pytest.mark.slow
def test_diverged_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny.get_config()
  config.train.learning_rate = 1e12
  config.train.warmup_epochs = 0.0
  config.train.schedule = "constant"
  config.train.checkpoint_every_steps = 1
  config.train.log_every_steps = 1
  with pytest.raises(TrainingError) as error:
    tasks.run_task(config, tmp_path)
  message = one_line(error)
  assert "diverged at step" in message and "train.learning_rate" in message
  diverged_at = int(message.split("diverged at step ")[1].split()[0])
  assert not (tmp_path / "results.json").exists()
  # Every step before the divergence was checkpointed; the last of them is kept and is finite.
  latest = checkpointing.Checkpointer(tmp_path / "checkpoints").latest_step()
  assert latest == diverged_at - 1 and f"(step {latest})" in message
  variables, _ = checkpointing.load_checkpoint(tmp_path)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))


def test_missing_checkpoint_path(tmp_path):
  with pytest.raises(CheckpointError) as error:
    checkpointing.load_checkpoint(tmp_path / "nowhere")
  assert "does not exist" in one_line(error) and "nowhere" in str(error.value)
  with pytest.raises(CheckpointError) as error:
    checkpointing.load_checkpoint(tmp_path)  # Exists but holds no checkpoint.
  assert "no checkpoint" in one_line(error)


@pytest.mark.slow
def test_corrupt_checkpoint_is_reported_not_crashed(tmp_path):
  config = tiny.get_config()
  trainer.train_and_evaluate(config, tmp_path)
  step_dir = tmp_path / "checkpoints" / "16" / "state"
  for path in step_dir.rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")
  with pytest.raises(CheckpointError) as error:
    checkpointing.load_checkpoint(tmp_path)
  assert "corrupt" in one_line(error) and "16" in str(error.value)


@pytest.mark.slow
def test_finished_run_is_never_overwritten_by_another_config(tmp_path):
  trainer.train_and_evaluate(tiny.get_config(), tmp_path)
  before = (tmp_path / "results.json").read_text()
  for key, value in (("learning_rate", 0.07), ("epochs", 1)):  # epochs may only grow.
    changed = tiny.get_config()
    changed.train[key] = value
    with pytest.raises(ConfigError) as error:
      tasks.run_task(changed, tmp_path)
    assert f"train.{key}" in one_line(error) and str(tmp_path) in str(error.value)
    assert (tmp_path / "results.json").read_text() == before
  assert json.loads(before)["config"]["train"]["epochs"] == 2


def test_all_user_errors_share_a_base_class():
  for cls in (ConfigError, CheckpointError, TrainingError):
    assert issubclass(cls, AdcordaError)

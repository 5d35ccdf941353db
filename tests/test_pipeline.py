"""The run/stage layer every task shares: format versions, one envelope, one mismatch message."""
from __future__ import annotations

import hashlib
import json
import types

import ml_collections
import numpy as np
import pytest

from adcorda_jax import __version__, pipeline
from adcorda_jax.errors import CheckpointError, ConfigError
from adcorda_jax.pipeline import fingerprint
from tests.helpers import one_line


def _config(**values) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"task": "demo", "seed": 0, "train": {"epochs": 2},
                                    **values})


def _finish(workdir, config) -> dict:
  with pipeline.open_run(workdir, config, task="demo") as run:
    assert run.finished is None
    run.claim()
    (run.path / "artifact.txt").write_text("work")
    return run.finish(run.results(answer=42), report="# demo\n", summary="answer 42")


def test_a_run_records_its_format_and_one_envelope(tmp_path):
  results = _finish(tmp_path, _config())
  record = json.loads((tmp_path / "run.json").read_text())
  assert record == {"format_version": pipeline.FORMAT_VERSION, "release": __version__,
                    "task": "demo"}
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  for key in ("status", "task", "format_version", "devices", "backend", "wall_seconds",
              "config"):
    assert key in saved, key
  assert saved["answer"] == 42 and saved["status"] == "complete"
  assert (tmp_path / "report.md").read_text() == "# demo\n"
  with pipeline.open_run(tmp_path, _config(), task="demo") as run:  # Finished: returned.
    assert run.finished == saved


def test_a_workdir_of_the_previous_release_still_resumes(tmp_path):
  """Release 0.1.0 wrote no run.json: its finished results come back, its work is continued."""
  _finish(tmp_path, _config())
  (tmp_path / "run.json").unlink()
  with pipeline.open_run(tmp_path, _config(), task="demo") as run:
    assert run.finished is not None and run.finished["answer"] == 42


def test_a_workdir_of_a_newer_format_is_refused_naming_its_release(tmp_path):
  _finish(tmp_path, _config())
  (tmp_path / "run.json").write_text(json.dumps({"format_version": 99, "release": "9.0.0"}))
  with pytest.raises(CheckpointError) as error:
    with pipeline.open_run(tmp_path, _config(), task="demo"):
      pass
  message = one_line(error)
  assert "written by adcorda-jax 9.0.0 (workdir format 99)" in message
  assert f"reads formats 1-{pipeline.FORMAT_VERSION}" in message


def test_a_changed_config_is_refused_with_the_one_mismatch_wording(tmp_path):
  _finish(tmp_path, _config())
  with pytest.raises(ConfigError) as error:
    with pipeline.open_run(tmp_path, _config(seed=1), task="demo"):
      pass
  assert "was made with a different config (differs at: seed)" in one_line(error)
  with pipeline.open_run(tmp_path, _config(seed=1), task="demo", strict=False) as run:
    assert run.finished is None  # Staged: the stages decide what is still valid.


def test_a_stage_checks_its_fingerprint_and_tolerates_retired_keys(tmp_path):
  stage = pipeline.Stage(tmp_path / "s", "adapt", {"adapt.epochs": 2, "adapt.lambda_": 1.0})
  assert stage.claim().done() is None
  assert stage.finish({"accuracy": 0.5}) == {"accuracy": 0.5}
  assert stage.claim().done() == {"accuracy": 0.5}
  with pytest.raises(CheckpointError) as error:
    pipeline.Stage(tmp_path / "s", "adapt", {"adapt.epochs": 3, "adapt.lambda_": 1.0}).claim()
  assert "stage 'adapt' in" in one_line(error)
  assert "was made with a different config (differs at: adapt.epochs); restore" in one_line(error)
  # A run that no longer reads adapt.lambda_ matches a record that still holds it ...
  retired = pipeline.Stage(tmp_path / "s", "adapt", {"adapt.epochs": 2},
                           frozenset({"adapt.lambda_"}))
  assert retired.claim().done() == {"accuracy": 0.5}
  # ... but not a record without the retirement rule.
  with pytest.raises(CheckpointError):
    pipeline.Stage(tmp_path / "s", "adapt", {"adapt.epochs": 2}).claim()


def test_differences_flatten_normalize_and_ignore():
  assert fingerprint.differences({"a": {"b": (1, 2)}, "c": 1}, {"a": {"b": [1, 2]}, "c": 1}) == []
  assert fingerprint.differences({"a": {"b": 1}}, {"a": {"b": 2}, "d": 0}) == ["a.b", "d"]
  assert fingerprint.differences({"x.y": 1}, {"x": {"y": 1}}) == []  # Flat == nested.
  assert fingerprint.differences({"a": 1, "b": 1}, {"a": 2, "b": 2}, ignore=("a",)) == ["b"]
  config = ml_collections.ConfigDict({"adapt": {"lambda_": 1.0, "log_every_steps": 5}})
  assert fingerprint.config_keys(config, ("adapt", "missing")) == {"adapt.lambda_": 1.0,
                                                                   "missing": None}


def test_digests_equal_what_release_0_1_0_recorded():
  """Saved attack runs and corrected sets hold these digests: they must never change."""
  images = np.linspace(0, 1, 2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
  labels = np.array([1, 0], np.int32)
  old = hashlib.sha1()  # The 0.1.0 formula of attacks.driver.data_digest.
  for array in (images, labels):
    old.update(str((array.shape, array.dtype.str)).encode())
    old.update(memoryview(array).cast("B"))
  assert fingerprint.arrays_digest(images, labels) == old.hexdigest()
  tree = {"dense": {"kernel": images[0], "bias": labels}}
  old = hashlib.sha1()  # The 0.1.0 formula of adcorda.stages.tree_digest (sorted dict keys).
  for path, leaf in (("['dense']['bias']", labels), ("['dense']['kernel']", images[0])):
    old.update(f"{path}{leaf.shape}{leaf.dtype.str}".encode())
    old.update(memoryview(np.ascontiguousarray(leaf)).cast("B"))
  assert fingerprint.tree_digest(tree) == old.hexdigest()
  assert fingerprint.tree_digest(tree) != fingerprint.tree_digest(
      {"dense": {"kernel": images[0] + 1, "bias": labels}})


def test_adcorda_batch_sizes_are_checked_against_the_mesh_before_any_stage():
  """A batch that the devices cannot split fails in read_settings, not after the correction."""
  from adcorda_jax.adcorda import settings as adcorda_settings
  from configs import adcorda_digits
  config = adcorda_digits.get_config()
  config.correct.batch_size, config.evaluate.batch_size, config.adapt.batch_size = 129, 129, 64
  three_devices = types.SimpleNamespace(devices=np.zeros(3))
  with pytest.raises(ConfigError) as error:
    adcorda_settings.read_settings(config, three_devices)
  assert one_line(error) == ("adapt.batch_size=64 cannot be split over 3 devices; use a multiple "
                             "of 3")
  config.adapt.batch_size = 66
  assert adcorda_settings.read_settings(config, three_devices).adapt.finetune.batch_size == 66

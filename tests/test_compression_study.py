"""`task=compression_study` end to end on digits: the grid, cached cells, findings, bad entries."""
from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from adcorda_jax import tasks
from adcorda_jax.data import load_dataset
from adcorda_jax.errors import CheckpointError, ConfigError
from adcorda_jax.study import compress, findings
from adcorda_jax.models import create_model
from adcorda_jax.study.shift_eval import build_shifted_sets, read_shift_settings, shift_accuracy
from adcorda_jax.evaluate import evaluator as model_evaluation
from adcorda_jax.training import sharding
from configs import compression_digits
from tests.helpers import one_line, override, registered_noise_pruning

CORRUPTIONS = "gaussian_noise,contrast,pixelate"


def tiny_config(**overrides):
  """configs/compression_digits.py cut down: one rate per method, 3 corruptions, short attacks."""
  config = compression_digits.get_config()
  config.train.epochs = 3
  config.study.rates.filter_pruning = (0.5,)
  config.study.rates.magnitude_pruning = (0.8,)
  config.study.rates.ptq = (8,)
  config.study.plot_corruptions = False
  config.adapt.epochs = 1
  config.distill.epochs = 2
  config.shift.corruptions = CORRUPTIONS
  config.shift.severities = (1, 5)
  config.evaluate.max_examples = 64
  config.evaluate.eps = (0.05,)
  config.evaluate.pgd.steps = 3
  return override(config, **overrides)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("study")
  return workdir, tasks.run_task(tiny_config(), workdir)


@pytest.mark.slow
def test_study_writes_the_grid_findings_report_and_plots(study):
  workdir, results = study
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  assert list(saved["networks"]) == ["large", "small"]
  names = {(c["network"], c["name"]) for c in saved["cells"]}
  assert names == {(n, c) for n in ("large", "small") for c in (
      "filter_pruning_0.5", "magnitude_pruning_0.8", "distillation_0.5", "ptq_w8")}
  assert [f["finding"] for f in saved["findings"]] == [1, 2, 3, 4]
  for finding in saved["findings"]:
    assert isinstance(finding["held"], bool) and finding["evidence"]
    assert isinstance(finding["adversarial"]["held"], bool)
    assert finding["adversarial"]["evidence"].startswith("pgd 0.05 / clean accuracy")
  for name in ("report.md", "accuracy_vs_compression.png", "large_vs_small.png"):
    assert (workdir / name).exists(), name
  report = (workdir / "report.md").read_text()
  assert "## Findings" in report and "| filter_pruning_0.5 |" in report
  for cell in saved["cells"]:
    assert set(cell["shift"]["per_corruption"]) == set(CORRUPTIONS.split(","))
    assert 0 <= cell["shift"]["corruption_mean"] <= 1
    assert cell["relative_robustness"] == pytest.approx(
        cell["shift"]["corruption_mean"] / cell["test_accuracy"])


@pytest.mark.slow
def test_compression_really_shrinks_each_network(study):
  _, results = study
  for label, network in results["networks"].items():
    cells = {c["name"]: c for c in results["cells"] if c["network"] == label}
    assert cells["filter_pruning_0.5"]["params"] < network["params"]
    assert cells["filter_pruning_0.5"]["flops"] < network["flops"]
    assert cells["distillation_0.5"]["params"] < network["params"] / 2
    magnitude = cells["magnitude_pruning_0.8"]
    assert magnitude["params"] == network["params"]
    assert magnitude["nonzero_params"] < 0.35 * network["params"]  # 80% of kernels zero.
    assert magnitude["details"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert cells["ptq_w8"]["size_bytes"] < network["size_bytes"] / 3.5
  assert results["networks"]["large"]["params"] > results["networks"]["small"]["params"]


def _unfinished_copy(workdir, tmp_path):
  """A copy of the finished study `workdir` without its results: rerunning it resumes."""
  copy = tmp_path / "study"
  shutil.copytree(workdir, copy)
  (copy / "results.json").unlink()
  return copy


def _count_compressions(monkeypatch) -> list[str]:
  """Records the path of every cell the study compresses (i.e. does not load from cache)."""
  calls = []
  original_call = compress.Compressor.__call__

  def counting(self, cell, *args, **kwargs):
    calls.append(cell.path)
    return original_call(self, cell, *args, **kwargs)

  monkeypatch.setattr(compress.Compressor, "__call__", counting)
  return calls


@pytest.mark.slow
def test_a_finished_cell_is_never_recomputed(study, tmp_path, monkeypatch):
  workdir, results = study
  copy = _unfinished_copy(workdir, tmp_path)
  # Drop one cell's result: only that cell may be compressed again.
  shutil.rmtree(copy / "cells" / "small" / "ptq_w8")
  calls = _count_compressions(monkeypatch)
  rerun = tasks.run_task(tiny_config(), copy)
  assert calls == ["small/ptq_w8/seed0"]
  for old, new in zip(results["cells"], rerun["cells"], strict=True):
    assert new["test_accuracy"] == old["test_accuracy"]
    assert new["shift"]["corruption_mean"] == old["shift"]["corruption_mean"]


@pytest.mark.slow
def test_more_seeds_reuse_the_finished_ones_and_are_averaged(study, tmp_path, monkeypatch):
  workdir, results = study
  copy = _unfinished_copy(workdir, tmp_path)
  calls = _count_compressions(monkeypatch)
  rerun = tasks.run_task(tiny_config(**{"study.methods": "magnitude_pruning",
                                        "study.seeds": (0, 1)}), copy)
  assert calls == ["large/magnitude_pruning_0.8/seed1", "small/magnitude_pruning_0.8/seed1"]
  before = {c["network"]: c for c in results["cells"] if c["method"] == "magnitude_pruning"}
  for cell in rerun["cells"]:
    seed0, seed1 = cell["per_seed"]
    assert seed0["test_accuracy"] == before[cell["network"]]["test_accuracy"]
    accuracies = [seed0["test_accuracy"], seed1["test_accuracy"]]
    assert cell["test_accuracy"] == pytest.approx(np.mean(accuracies))
    assert cell["test_accuracy_std"] == pytest.approx(np.std(accuracies, ddof=1))
    relative = [findings.relative_robustness(s) for s in (seed0, seed1)]
    assert cell["relative_robustness_std"] == pytest.approx(np.std(relative, ddof=1))


@pytest.mark.slow
def test_a_new_method_joins_a_finished_study_without_other_edits(study, tmp_path, monkeypatch):
  workdir, results = study
  copy = _unfinished_copy(workdir, tmp_path)
  calls = _count_compressions(monkeypatch)
  with registered_noise_pruning():
    rerun = tasks.run_task(tiny_config(**{
        "study.methods": "noise_pruning,ptq", "study.seeds": (0, 1),
        "study.rates.noise_pruning": (0.5,)}), copy)
  # The networks and PTQ cells are reused; noise pruning trains nothing, so it runs one seed.
  assert calls == ["large/noise_pruning_0.5/seed0", "small/noise_pruning_0.5/seed0"]
  assert [c["name"] for c in rerun["cells"]] == ["noise_pruning_0.5", "ptq_w8"] * 2
  assert rerun["networks"] == results["networks"]
  for cell in rerun["cells"]:
    if cell["method"] == "noise_pruning":
      assert cell["nonzero_params"] < 0.7 * cell["params"]
  # Noise pruning is a pruning method to the findings; there is no distillation to compare.
  assert rerun["findings"][2]["held"] is None and "pruning 0." in rerun["findings"][2]["evidence"]


@pytest.mark.slow
def test_predictors_of_equal_networks_compile_once():
  """Each seed's and cell's network is a new module: equal ones share one compiled predictor."""
  mesh = sharding.make_mesh()
  images = np.random.default_rng(0).random((40, 8, 8, 1), np.float32)
  compiled = model_evaluation._module_labels._cache_size()
  for width, new_programs in ((0.25, 1), (0.25, 0), (0.125, 1), (0.25, 0)):
    model = create_model({"name": "small_cnn", "width": width}, 10, (0.5,), (0.25,))
    variables = model.init(jax.random.key(0), images[:1])
    predict = model_evaluation.make_predictor(model.apply, 16, mesh)
    labels = predict(variables, images)
    np.testing.assert_array_equal(labels, np.argmax(model.apply(variables, images), -1))
    assert model_evaluation._module_labels._cache_size() == compiled + new_programs
    compiled += new_programs


@pytest.mark.slow
def test_changed_cell_settings_are_refused_not_mixed(study, tmp_path):
  workdir, _ = study
  copy = _unfinished_copy(workdir, tmp_path)
  with pytest.raises(CheckpointError) as error:
    tasks.run_task(tiny_config(**{"adapt.learning_rate": 0.02}), copy)
  assert "adapt.learning_rate" in one_line(error)


def test_findings_follow_the_numbers():
  def entry(network, method, rate, clean, shifted):
    return {"network": network, "method": method, "rate": rate, "test_accuracy": clean,
            "shift": {"corruption_mean": shifted, "domains": {}}}
  originals = {"large": entry("large", "original", 0, 1.0, 0.9),
               "small": entry("small", "original", 0, 1.0, 0.9)}
  cells = [entry("large", "filter_pruning", 0.5, 1.0, 0.7), entry("small", "filter_pruning", 0.5,
                                                                  1.0, 0.85),
           entry("large", "distillation", 0.5, 1.0, 0.8), entry("small", "distillation", 0.5, 1.0,
                                                                0.88),
           entry("large", "ptq", 8.0, 1.0, 0.9), entry("small", "ptq", 8.0, 1.0, 0.9)]
  held = {f["finding"]: f["held"] for f in findings.decide_findings(originals, cells,
                                                                       ["large", "small"])}
  assert held == {1: True, 2: True, 3: True, 4: True}
  # The adversarial verdicts apply the same rules to robust / clean accuracy: an attack that
  # leaves every network at the same relative accuracy holds no finding.
  for c in [*cells, *originals.values()]:
    c["robust_accuracy"] = {"pgd": {"0.1": 0.5 * c["test_accuracy"]}}
  records = findings.decide_findings(originals, cells, ["large", "small"],
                                     adversarial=("pgd", 0.1))
  assert [r["adversarial"]["held"] for r in records] == [False, False, False, False]
  assert [r["held"] for r in records] == [True, True, True, True]
  cells[0]["robust_accuracy"]["pgd"]["0.1"] = 0.1  # large filter pruning falls under attack.
  records = findings.decide_findings(originals, cells, ["large", "small"],
                                     adversarial=("pgd", 0.1))
  assert [r["adversarial"]["held"] for r in records] == [False, True, True, False]
  # A compressed network more robust than its original breaks finding 1; one network: no 2.
  cells[0] = entry("large", "filter_pruning", 0.5, 1.0, 0.99)
  cells[2] = entry("large", "distillation", 0.5, 1.0, 0.99)
  held = {f["finding"]: f["held"] for f in findings.decide_findings(
      {"large": originals["large"]}, [c for c in cells if c["network"] == "large"], ["large"])}
  assert held[1] is False and held[2] is None and held[4] is False
  # Both networks gain robustness, the larger less: "larger loses more" does not hold.
  gains = [entry("large", "filter_pruning", 0.5, 1.0, 0.91),
           entry("small", "filter_pruning", 0.5, 1.0, 0.95)]
  gains[0]["relative_robustness_std"] = 0.02
  records = findings.decide_findings(originals, gains, ["large", "small"])
  assert records[1]["held"] is False and "large -0.010" in records[1]["evidence"]
  assert all("seed std of one cell's relative robustness: 0.020" in r["evidence"]
             for r in records)


@pytest.mark.parametrize("key, value, expected", [
    ("study.networks", ("vgg:1.0",), "study.networks[0]: unknown model 'vgg'"),
    ("study.networks", ("small_cnn",), "study.networks[0] must be 'model_name:width'"),
    ("study.networks", ("small_cnn:0",), "study.networks[0]: width must be a number > 0"),
    ("study.methods", "pruning", "unknown compression method 'pruning' (study.methods)"),
    ("study.rates.ptq", (33,), "study.rates.ptq entries are weight bits"),
    ("study.rates.filter_pruning", (1.0,), "study.rates.filter_pruning entries are fractions"),
    ("study.rates.distillation", (), "study.rates.distillation must be a non-empty tuple"),
    ("study.magnitude_scope", "row", "study.magnitude_scope='row' is not valid"),
    ("shift.corruptions", "fog", "shift.corruptions='fog' is not valid"),
    ("shift.corruptions", "saturate", "shift.corruptions: 'saturate' needs colour images"),
    ("shift.severities", (6,), "shift.severities must be distinct values from 1..5"),
    ("distill.temperature", 0.0, "distill.temperature"),
])
def test_bad_grid_entries_name_their_key(tmp_path, key, value, expected):
  with pytest.raises(ConfigError) as error:
    tasks.run_task(tiny_config(**{key: value}), tmp_path)
  assert expected in one_line(error)
  assert not (tmp_path / "networks").exists() and not (tmp_path / "cells").exists()


def test_domains_are_scored_on_all_their_images_and_must_share_classes(tmp_path):
  config = tiny_config()
  config.shift.domains.again = config.data.copy_and_resolve_references()
  dataset = load_dataset(config.data, 0)
  sets = build_shifted_sets(read_shift_settings(config, 1), dataset, jax.random.key(0), 0)
  images, labels = sets.domains["again"]
  assert len(labels) == 1797  # Every split of the domain: all of digits.
  assert sets.corrupted[("contrast", 5)].shape == dataset.test.images.shape
  always_zero = lambda variables, x: np.zeros(len(x), np.int32)  # noqa: E731
  scored = shift_accuracy(always_zero, None, sets)
  assert scored["domains"]["again"] == pytest.approx(np.mean(labels == 0))
  assert scored["corruption_mean"] == pytest.approx(np.mean(dataset.test.labels == 0))
  # A domain with other classes is refused, naming it.
  for name in ("a", "b"):
    (tmp_path / name).mkdir()
    for i in range(3):
      Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
  folder = config.data.copy_and_resolve_references()
  folder.name, folder.data_dir, folder.image_size, folder.grayscale = (
      "image_folder", str(tmp_path), 8, True)
  config.shift.domains.two_classes = folder
  with pytest.raises(ConfigError) as error:
    build_shifted_sets(read_shift_settings(config, 1), dataset, jax.random.key(0), 0)
  assert "shift.domains.two_classes: 2 classes" in one_line(error)


@pytest.mark.slow
def test_gradual_magnitude_pruning_reaches_its_sparsity(tmp_path):
  config = tiny_config(**{"study.networks": ("small_cnn:0.5",),
                          "study.methods": "magnitude_pruning",
                          "study.magnitude_schedule": "gradual", "adapt.epochs": 2,
                          "study.rates.magnitude_pruning": (0.7,)})
  results = tasks.run_task(config, tmp_path)
  cell, = results["cells"]
  assert cell["details"]["sparsity"] == pytest.approx(0.7, abs=0.01)
  # One network only: finding 2 cannot be tested, and no distillation/PTQ cells for 3 and 4.
  assert [f["held"] for f in results["findings"]][1:] == [None, None, None]

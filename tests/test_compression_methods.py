"""The compression-method registry: names, rate checks, cell names, fingerprints, a new method."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from adcorda_jax.training.finetune import without_alignment
from adcorda_jax.pipeline.fingerprint import config_keys
from adcorda_jax.training import finetune
from adcorda_jax.data import load_dataset
from adcorda_jax.errors import ConfigError
from adcorda_jax.study import findings
from adcorda_jax.study.compress import Compressor
from adcorda_jax.study.grid import read_study_settings
from adcorda_jax.study.methods import COMPRESSION_METHODS, read_method_settings
from configs import compression_digits
from tests.helpers import one_line, override, registered_noise_pruning

PAPER_ORDER = ["filter_pruning", "magnitude_pruning", "distillation", "ptq"]


def test_the_registry_lists_the_four_methods_in_the_papers_order():
  assert COMPRESSION_METHODS.names() == sorted(PAPER_ORDER)
  assert COMPRESSION_METHODS.registered() == PAPER_ORDER
  config = compression_digits.get_config()
  del config.study.methods  # The default is every method, in registration order.
  assert read_study_settings(config).methods == tuple(PAPER_ORDER)


def test_an_unknown_method_is_one_line_listing_the_valid_names():
  config = override(compression_digits.get_config(), **{"study.methods": "ptq,pruning"})
  with pytest.raises(ConfigError) as error:
    read_study_settings(config)
  assert one_line(error).startswith(
      "unknown compression method 'pruning' (study.methods); valid names: distillation, "
      "filter_pruning, magnitude_pruning, ptq")


@pytest.mark.parametrize("method, rate, message", [
    ("ptq", 9, "study.rates.ptq entries are weight bits, integers in 2..8; got 9"),
    ("ptq", 4.5, "study.rates.ptq entries are weight bits, integers in 2..8; got 4.5"),
    ("filter_pruning", 1.0,
     "study.rates.filter_pruning entries are fractions removed, in (0, 1); got 1.0"),
    ("magnitude_pruning", 0,
     "study.rates.magnitude_pruning entries are fractions removed, in (0, 1); got 0"),
    ("distillation", 1.5, ("study.rates.distillation entries are student widths relative to the "
                           "teacher, in (0, 1); got 1.5")),
])
def test_each_method_checks_its_rates_with_one_line(method, rate, message):
  config = override(compression_digits.get_config(), **{f"study.rates.{method}": (rate,)})
  with pytest.raises(ConfigError) as error:
    read_study_settings(config)
  assert one_line(error) == message


def test_cell_names_and_seeds_come_from_the_method():
  config = override(compression_digits.get_config(), **{"study.seeds": (0, 1)})
  cells = read_study_settings(config).cells()
  names = {(c.name, c.seed) for c in cells if c.network.label == "large"}
  assert names == {(name, seed) for seed in (0, 1) for name in (
      "filter_pruning_0.5", "filter_pruning_0.75", "magnitude_pruning_0.5",
      "magnitude_pruning_0.9", "distillation_0.5")} | {("ptq_w8", 0), ("ptq_w4", 0)}
  assert cells[0].path == "large/filter_pruning_0.5/seed0"


def _recorded_fingerprint(config, cell, scope, schedule):
  """The cell fingerprint as the study wrote it before the registry (it must not change)."""
  keys = ("train", "adapt", "model") + (("distill",) if cell.method == "distillation" else ())
  magnitude = cell.method == "magnitude_pruning"
  return {"study.magnitude_scope": scope if magnitude else None,
          **({"study.magnitude_schedule": schedule}
             if magnitude and schedule != "one_shot" else {}),
          "cell": cell.path,
          **without_alignment(config_keys(config, keys))}


@pytest.mark.parametrize("scope, schedule", [("global", "one_shot"), ("layer", "gradual")])
def test_cell_fingerprints_are_unchanged_byte_for_byte(scope, schedule):
  config = override(compression_digits.get_config(), **{
      "study.magnitude_scope": scope, "study.magnitude_schedule": schedule})
  settings = read_study_settings(config)
  method_settings = read_method_settings(config, settings.methods)
  for cell in settings.cells():
    method = COMPRESSION_METHODS.get(cell.method)
    new = method.cell_fingerprint(config, cell, method_settings[cell.method])
    assert json.dumps(new) == json.dumps(_recorded_fingerprint(config, cell, scope, schedule))


@pytest.mark.slow
def test_a_registered_method_runs_through_the_grid_and_the_compressor(tmp_path):
  config = override(compression_digits.get_config(), **{
      "study.networks": ("small_cnn:0.5",), "study.methods": "noise_pruning,ptq",
      "study.seeds": (0, 1), "study.rates.noise_pruning": (0.5,)})
  with pytest.raises(ConfigError) as error:  # Not registered yet: an unknown name.
    read_study_settings(config)
  assert "unknown compression method 'noise_pruning'" in one_line(error)
  with registered_noise_pruning():
    assert "noise_pruning" in COMPRESSION_METHODS.names()
    with pytest.raises(ConfigError) as error:
      read_study_settings(override(config.copy_and_resolve_references(),
                                   **{"study.rates.noise_pruning": (2.0,)}))
    assert one_line(error) == ("study.rates.noise_pruning entries are fractions zeroed, in "
                               "(0, 1); got 2.0")
    settings = read_study_settings(config)
    cells = settings.cells()
    assert [c.path for c in cells] == ["net0/noise_pruning_0.5/seed0", "net0/ptq_w8/seed0",
                                       "net0/ptq_w4/seed0"]
    dataset = load_dataset(config.data, 0)
    compressor = Compressor(dataset, finetune.read_finetune_settings(config),
                            read_method_settings(config, settings.methods))
    model_config = settings.networks[0].model_config(config.model.to_dict())
    model = compressor.build(model_config)
    variables = model.init(jax.random.key(0), dataset.train.images[:1])
    compressed = compressor(cells[0], model_config, model, variables, {}, tmp_path)
    kernels = [np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(
        compressed.variables["params"]) if jax.tree_util.keystr(p).endswith("['kernel']")]
    zeroed = np.mean(np.concatenate([k.ravel() == 0 for k in kernels]))
    assert zeroed == pytest.approx(0.5, abs=0.05)
    assert compressed.details == {"zeroed": 0.5}
    fingerprint = COMPRESSION_METHODS.get("noise_pruning").cell_fingerprint(config, cells[0], None)
    assert fingerprint["cell"] == "net0/noise_pruning_0.5/seed0" and "train.epochs" in fingerprint
  assert "noise_pruning" not in COMPRESSION_METHODS


def test_findings_tolerate_missing_and_unknown_methods():
  def entry(network, method, rate, shifted):
    return {"network": network, "method": method, "rate": rate, "test_accuracy": 1.0,
            "shift": {"corruption_mean": shifted, "domains": {}}}
  originals = {"large": entry("large", "original", 0, 0.9)}
  # No PTQ and no distillation; a method nobody registered counts as compressed only.
  cells = [entry("large", "filter_pruning", 0.5, 0.8), entry("large", "mystery", 0.5, 0.7)]
  records = findings.decide_findings(originals, cells, ["large"])
  assert [r["held"] for r in records] == [True, None, None, None]
  assert "2 of 2 cells below" in records[0]["evidence"]
  assert records[2]["evidence"].endswith("mean: distillation n/a, pruning 0.800")
  # A registered method of the pruning family joins the pruning group.
  with registered_noise_pruning():
    cells.append(entry("large", "noise_pruning", 0.5, 0.6))
    cells.append(entry("large", "distillation", 0.5, 0.75))
    records = findings.decide_findings(originals, cells, ["large"])
  assert records[2]["held"] is True  # distillation 0.75 > pruning mean (0.8 + 0.6) / 2.
  assert records[2]["evidence"].endswith("mean: distillation 0.750, pruning 0.700")

"""Quantized networks as tasks: `task=quantize` (PTQ grid, integer export, QAT) and `task=adcorda`
with `model.quant`, on the session's tiny digits baseline (`tiny_baseline`, tests/conftest.py)."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from adcorda_jax import tasks
from adcorda_jax.pipeline.fingerprint import tree_digest
from adcorda_jax.training import finetune
from adcorda_jax.training.baseline import baseline_config
from adcorda_jax.data import load_dataset
from adcorda_jax.errors import ConfigError
from adcorda_jax.quant.deploy import quantization_from_config
from adcorda_jax.quant import export
from adcorda_jax.quant.export import model_size_bytes
from adcorda_jax.training import checkpointing
from configs import quantize_digits, tiny
from tests.helpers import one_line, override
from tests.test_adcorda_task import tiny_config as tiny_adcorda_config

# The tiny digits baseline of configs/tiny.py; its 8-bit PTQ loses at most this much test accuracy
# (measured: 0.0 points per channel and per tensor on 359 test digits, float 91.4%; 2 bits per
# tensor 53.5%, QAT at 4 bits 92.3%).
PTQ8_MAX_LOSS = 0.01


def tiny_quantize_config(baseline, **overrides):
  config = quantize_digits.get_config()
  config.quantize.checkpoint = str(baseline)
  config.data = tiny.get_config().data  # The baseline's training data.
  config.quantize.bits = (8, 2)
  config.quantize.qat_bits = (4,)
  config.quantize.seeds = (0, 1)
  config.adapt.epochs = 1
  config.evaluate.max_examples = 64
  config.evaluate.batch_size = 32
  config.evaluate.pgd.steps = 3
  return override(config, **overrides)


@pytest.fixture(scope="module")
def baseline(tiny_baseline):
  """The session's tiny digits baseline (configs/tiny.py, tests/conftest.py): read-only."""
  return tiny_baseline.workdir


@pytest.fixture(scope="module")
def quantized(baseline, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("quantize")
  return workdir, tasks.run_task(tiny_quantize_config(baseline), workdir)


@pytest.mark.slow
def test_quantize_writes_every_variant_with_accuracy_and_size(quantized):
  workdir, results = quantized
  names = ["float", "ptq_w8_per_tensor", "ptq_w8_per_channel", "ptq_w2_per_tensor",
           "ptq_w2_per_channel", "qat_w4"]
  assert results["variant_order"] == names
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(results))
  for name in names:
    assert 0 <= saved["variants"][name]["test_accuracy"] <= 1
    assert saved["variants"][name]["size_bytes"] > 0
  for name in ("report.md", "accuracy_vs_bits.png", "exported/ptq_w2_per_channel.npz",
               "exported/qat_w4_seed1.npz"):
    assert (workdir / name).exists(), name
  assert "| ptq_w2_per_channel |" in (workdir / "report.md").read_text()
  assert saved["variants"]["qat_w4"]["runs"] == 2


@pytest.mark.slow
def test_sizes_follow_bits_and_granularity(quantized, baseline):
  _, results = quantized
  v = results["variants"]
  variables, _ = checkpointing.load_checkpoint(baseline)
  assert v["float"]["size_bytes"] == model_size_bytes(variables["params"])
  assert v["ptq_w2_per_tensor"]["size_bytes"] < v["ptq_w8_per_tensor"]["size_bytes"] \
      < v["float"]["size_bytes"]
  # Per-channel grids store one float32 scale per output channel instead of one per kernel.
  kernels = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
             if path[-1].key == "kernel"]
  extra = 4 * sum(k.shape[-1] - 1 for k in kernels)
  assert v["ptq_w8_per_channel"]["size_bytes"] - v["ptq_w8_per_tensor"]["size_bytes"] == extra
  assert v["ptq_w8_per_channel"]["compression_ratio"] > 3.5  # ~4x: int8 instead of float32.


@pytest.mark.slow
def test_exported_integer_models_match_fake_quantization(quantized):
  _, results = quantized
  for name, variant in results["variants"].items():
    if variant["kind"] == "float":
      continue
    assert variant["export_matches"], name
    assert variant["exported_test_accuracy"] == variant["test_accuracy"], name


@pytest.mark.slow
def test_exported_file_alone_rebuilds_the_quantized_model(quantized, baseline):
  workdir, results = quantized
  _, meta = checkpointing.load_checkpoint(baseline)
  model = checkpointing.model_from_meta(meta)
  loaded = export.load_exported(workdir / "exported" / "ptq_w2_per_channel.npz")
  assert loaded["bits"] == 2 and loaded["batch_stats"]
  variables = {"params": export.import_integer_weights(loaded),
               "batch_stats": loaded["batch_stats"]}
  dataset = load_dataset(tiny_quantize_config(baseline).data, 0)
  accuracy = np.mean(np.argmax(model.apply(variables, dataset.test.images), -1)
                     == dataset.test.labels)
  assert accuracy == pytest.approx(results["variants"]["ptq_w2_per_channel"]["test_accuracy"])


@pytest.mark.slow
def test_batch_norm_folding_before_ptq(baseline, tmp_path):
  config = tiny_quantize_config(baseline, **{
      "quantize.bits": (8,), "quantize.granularities": ("per_channel",), "quantize.qat_bits": (),
      "model.quant.fold_batch_norm": True})
  v = tasks.run_task(config, tmp_path)["variants"]
  assert v["ptq_w8_per_channel"]["export_matches"]
  assert v["float"]["test_accuracy"] - v["ptq_w8_per_channel"]["test_accuracy"] <= PTQ8_MAX_LOSS


@pytest.mark.slow
def test_8_bit_ptq_loses_at_most_a_point(quantized):
  _, results = quantized
  v = results["variants"]
  for granularity in ("per_tensor", "per_channel"):
    loss = v["float"]["test_accuracy"] - v[f"ptq_w8_{granularity}"]["test_accuracy"]
    assert loss <= PTQ8_MAX_LOSS, (granularity, loss)
  # 2 bits is a real loss without fine-tuning, and QAT recovers most of it at 4 bits.
  assert v["ptq_w2_per_tensor"]["test_accuracy"] < v["float"]["test_accuracy"] - 0.1
  assert v["qat_w4"]["test_accuracy"] > v["float"]["test_accuracy"] - 0.02


@pytest.mark.slow
def test_quantize_rerun_is_served_from_the_workdir(quantized, baseline, monkeypatch):
  workdir, results = quantized
  monkeypatch.setattr(finetune.Finetuner, "run", lambda *a, **k: pytest.fail("retrained"))
  assert tasks.run_task(tiny_quantize_config(baseline), workdir) == results


@pytest.mark.slow
def test_activation_quantization_and_bpda_attacks(baseline, tmp_path):
  config = tiny_quantize_config(baseline, **{
      "quantize.bits": (8,), "quantize.granularities": ("per_channel",), "quantize.qat_bits": (),
      "model.quant.activation_bits": 8, "model.quant.attack_gradient": "bpda"})
  results = tasks.run_task(config, tmp_path)
  v = results["variants"]
  assert list(v) == ["float", "ptq_w8a8_per_channel"]
  assert abs(v["float"]["test_accuracy"] - v["ptq_w8a8_per_channel"]["test_accuracy"]) <= 0.02
  assert v["ptq_w8a8_per_channel"]["export_matches"]
  assert results["quantization"]["attack_gradient"] == "bpda"


@pytest.mark.slow
def test_qat_moves_float_weights_and_deploys_on_the_grid(baseline, tmp_path):
  variables, meta = checkpointing.load_checkpoint(baseline)
  model = checkpointing.model_from_meta(meta)
  config = tiny_adcorda_config()
  config.model.quant.weight_bits = 2
  config.model.quant.per_channel = False
  quant = quantization_from_config(config.model)
  dataset = load_dataset(config.data, 0)
  runner = finetune.Finetuner(
      model, variables["params"], finetune.read_finetune_settings(config), total_steps=4,
      steps_per_epoch=4, num_classes=dataset.num_classes,
      apply_fn=quant.qat_apply_fn(model))
  result = runner.run(variables, (dataset.train.images[:256], dataset.train.labels[:256]), None,
                      seed=0, directory=tmp_path, meta=meta)
  before = variables["params"]["classifier"]["kernel"]
  after = result.variables["params"]["classifier"]["kernel"]
  assert not np.allclose(before, after)  # Straight-through gradients reached the float kernel.
  deployed = quant.qat_variables(result.variables)["params"]["classifier"]["kernel"]
  assert len(np.unique(np.asarray(deployed))) <= 3  # Symmetric 2-bit grid: {-s, 0, s}.


@pytest.fixture(scope="module")
def quantized_adcorda(baseline, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("adcorda_w4")
  config = tiny_adcorda_config(**{"adcorda.baseline_checkpoint": str(baseline)})
  config.data = tiny.get_config().data  # The baseline's training data.
  config.model.quant.weight_bits = 4
  return workdir, config, tasks.run_task(config, workdir)


@pytest.mark.slow
def test_adcorda_on_a_quantized_network_reports_quantization_names(quantized_adcorda):
  _, _, results = quantized_adcorda
  q = results["quantization"]
  assert set(q["variants"]) == {"ptq_w4_per_channel", "qat_w4", "corrected_ce_w4", "adcorda_w4"}
  assert q["variants"]["adcorda_w4"]["test_accuracy"] == \
      results["variants"]["adcorda"]["test_accuracy"]
  assert q["size_bytes"] < q["float_size_bytes"] / 6
  for variant in results["variants"].values():
    assert variant["size_bytes"] == q["size_bytes"]


@pytest.mark.slow
def test_adcorda_quantized_stages_run_on_the_quantized_network(quantized_adcorda, baseline):
  workdir, config, results = quantized_adcorda
  variables, meta = checkpointing.load_checkpoint(baseline)
  model = checkpointing.model_from_meta(meta)
  quant = quantization_from_config(config.model)
  dataset = load_dataset(config.data, 0)
  # The baseline variant is the PTQ network, not the float one.
  ptq = quant.ptq_variables(variables)
  accuracy = np.mean(np.argmax(model.apply(ptq, dataset.test.images), -1) == dataset.test.labels)
  assert results["variants"]["baseline"]["test_accuracy"] == pytest.approx(accuracy)
  # Fine-tuned variants are evaluated as deployed on the 4-bit grid.
  tuned, _ = checkpointing.load_checkpoint(workdir / "adapt" / "adcorda" / "seed0")
  recorded = json.loads((workdir / "evaluate" / "adcorda" / "seed0" / "stage.json").read_text())
  assert recorded["evaluate.params_sha1"] == tree_digest(quant.qat_variables(tuned))
  # Stage 1 corrected the PTQ network's training errors, and says so in the set's provenance.
  assert results["correction"]["misclassified"] == int(np.sum(
      np.argmax(model.apply(ptq, dataset.train.images), -1) != dataset.train.labels))
  sidecar = json.loads((workdir / "correct" / "corrected_set.json").read_text())
  assert sidecar["provenance"]["quantization"]["model.quant.weight_bits"] == 4


@pytest.mark.parametrize("key, value, expected", [
    ("quantize.bits", (33,), "quantize.bits must be a tuple of distinct integers in 2..8"),
    ("quantize.bits", (0,), "quantize.bits"),
    ("quantize.granularities", ("per_row",), "quantize.granularities"),
    ("model.quant.calibration", "kl", "model.quant.calibration='kl' is not valid"),
    ("model.quant.activation_bits", 33, "model.quant.activation_bits must be an integer"),
])
def test_bad_quantize_config_names_its_key(tmp_path, key, value, expected):
  with pytest.raises(ConfigError) as error:  # Checked before the checkpoint is even looked for.
    tasks.run_task(tiny_quantize_config(tmp_path / "no_checkpoint", **{key: value}), tmp_path)
  assert expected in one_line(error)


@pytest.mark.parametrize("field, value, expected", [
    ("weight_bits", 33, "model.quant.weight_bits must be an integer in 2..8 (0 = off)"),
    ("activation_bits", 8, "model.quant.activation_bits is not supported by task=adcorda"),
    ("fold_batch_norm", True, "model.quant.fold_batch_norm=True is not supported"),
])
def test_bad_adcorda_quant_config_names_its_key(tmp_path, field, value, expected):
  config = tiny_adcorda_config()
  config.model.quant.weight_bits = 4
  config.model.quant[field] = value
  with pytest.raises(ConfigError) as error:
    tasks.run_task(config, tmp_path)
  assert expected in one_line(error)
  assert not (tmp_path / "baseline").exists()


def test_train_task_refuses_quantized_models(tmp_path):
  config = baseline_config(quantize_digits.get_config())
  config.model.quant = {"weight_bits": 4}
  with pytest.raises(ConfigError) as error:
    tasks.run_task(config, tmp_path)
  assert "model.quant.weight_bits=4: task=train trains float models" in one_line(error)

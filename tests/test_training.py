"""Training: batching, optimizer, steps, end-to-end runs, resume, and 1 vs 4 devices."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adcorda_jax.data import load_dataset
from adcorda_jax.models import create_model
from adcorda_jax.training import batches, checkpointing, optim, steps, trainer
from configs import tiny

REPO = Path(__file__).resolve().parents[1]


class _Stop(Exception):
  """Raised by a step callback to simulate a run killed mid-training."""


def test_train_batches_cover_each_epoch_exactly_once():
  num_examples, batch_size, seed = 50, 8, 3
  stream = np.concatenate([batches.train_batch_indices(num_examples, batch_size, s, seed)
                           for s in range(25)])  # 200 indices = 4 epochs, straddling batches.
  for epoch in range(4):
    np.testing.assert_array_equal(np.sort(stream[epoch * 50:(epoch + 1) * 50]), np.arange(50))
  np.testing.assert_array_equal(stream[:8], batches.train_batch_indices(50, 8, 0, seed))
  assert not np.array_equal(stream[:50], stream[50:100])  # Reshuffled every epoch.


def test_padded_batches_keep_every_example_once():
  images = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
  labels = np.arange(10, dtype=np.int32)
  got = list(batches.padded_batches(images, labels, 4))
  assert [b["image"].shape[0] for b in got] == [4, 4, 4]
  mask = np.concatenate([b["mask"] for b in got])
  np.testing.assert_array_equal(mask, [1] * 10 + [0, 0])
  kept = np.concatenate([b["label"] for b in got])[mask == 1]
  np.testing.assert_array_equal(kept, labels)


def test_schedule_warms_up_then_decays_to_zero():
  config = tiny.get_config().train
  config.warmup_epochs = 1.0
  schedule = optim.make_schedule(config, total_steps=100, steps_per_epoch=10)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(config.learning_rate)
  assert float(schedule(5)) == pytest.approx(config.learning_rate / 2)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_only_shrinks_kernels():
  config = tiny.get_config().train
  config.weight_decay, config.momentum = 0.5, 0.0
  tx = optim.make_optimizer(config, optax.constant_schedule(1.0))
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.5 * np.ones((2, 2)))
  np.testing.assert_array_equal(updates["dense"]["bias"], np.zeros(2))


@pytest.mark.slow
def test_train_step_lowers_loss_on_a_fixed_batch():
  config = tiny.get_config()
  model = create_model(config.model, 10, (0.5,), (0.25,))
  rng = jax.random.key(0)
  images = jax.random.uniform(rng, (32, 8, 8, 1))
  labels = jnp.arange(32) % 10
  tx = optax.sgd(0.05, momentum=0.9)
  state = steps.create_train_state(rng, model, (8, 8, 1), tx)
  step = jax.jit(functools.partial(steps.train_step, num_classes=10, augment_padding=None))
  batch = {"image": images, "label": labels}
  state, first = step(state, batch, rng)
  for _ in range(20):
    state, metrics = step(state, batch, rng)
  chex.assert_tree_all_finite(state.params)
  assert float(metrics["loss"]) < 0.5 * float(first["loss"])
  assert int(state.step) == 21


@pytest.mark.slow
def test_end_to_end_run_writes_artifacts_and_is_not_retrained(tmp_path):
  config = tiny.get_config()
  results = trainer.train_and_evaluate(config, tmp_path)
  for name in ("results.json", "report.md", "training_curves.png", "metrics.jsonl",
               "config.json"):
    assert (tmp_path / name).exists(), name
  saved = json.loads((tmp_path / "results.json").read_text())
  for key in ("task", "dataset", "model", "params", "train_accuracy", "val_accuracy",
              "test_accuracy", "wall_seconds", "examples_per_second", "config"):
    assert key in saved, key
  assert saved["test_examples"] == 359  # Every digits test image counted (stratified 20%).
  assert saved["test_accuracy"] > 0.5  # 2 epochs on 256 digits; chance is 0.1.
  assert saved["config"]["train"]["epochs"] == 2
  calls = []
  again = trainer.train_and_evaluate(config, tmp_path, step_callback=lambda *a: calls.append(a))
  assert calls == [] and again["test_accuracy"] == results["test_accuracy"]


@pytest.mark.slow
def test_checkpoint_loads_by_path_without_the_runs_config(tmp_path):
  results = trainer.train_and_evaluate(tiny.get_config(), tmp_path / "run")
  variables, meta = checkpointing.load_checkpoint(tmp_path / "run" / "checkpoints" / "16")
  model = checkpointing.model_from_meta(meta)  # Rebuilt from the checkpoint alone.
  dataset = load_dataset(tiny.get_config().data, seed=0)
  logits, features = model.apply(variables, dataset.test.images, return_features=True)
  chex.assert_shape(logits, (len(dataset.test), meta["num_classes"]))
  assert features.ndim == 2 and features.shape[0] == len(dataset.test)
  correct = int(np.sum(np.argmax(logits, -1) == dataset.test.labels))
  assert correct == round(results["test_accuracy"] * results["test_examples"])


def _params(workdir: Path):
  variables, _ = checkpointing.load_checkpoint(workdir)
  return variables


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_parameters(tmp_path):
  config = tiny.get_config()  # 16 steps, checkpoint every 4.
  uninterrupted = trainer.train_and_evaluate(config, tmp_path / "full")

  def kill_at_step_6(step, state):
    if step == 6:
      raise _Stop

  with pytest.raises(_Stop):
    trainer.train_and_evaluate(config, tmp_path / "killed", step_callback=kill_at_step_6)
  assert checkpointing.Checkpointer(tmp_path / "killed" / "checkpoints").latest_step() == 4
  resumed = trainer.train_and_evaluate(config, tmp_path / "killed")
  assert resumed["resumed_from_step"] == 4
  # Bitwise: every step is a pure function of (checkpointed state, seed, step).
  chex.assert_trees_all_equal(_params(tmp_path / "full"), _params(tmp_path / "killed"))
  assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
  steps_logged = [r["step"] for r in map(json.loads, (tmp_path / "killed" / "metrics.jsonl")
                                         .read_text().splitlines()) if "loss" in r]
  assert steps_logged == sorted(set(steps_logged))  # No duplicated steps after the resume.


_FOUR_DEVICE_RUN = """
import json, sys
import jax
from adcorda_jax.training import trainer
from adcorda_jax.errors import ConfigError
from configs import tiny
assert jax.device_count() == 4, jax.devices()
config = tiny.get_config()
config.train.batch_size = 30
try:
  trainer.train_and_evaluate(config, sys.argv[1] + "/bad")
  raise SystemExit("batch 30 over 4 devices was accepted")
except ConfigError as e:
  print("ERROR:", e)
results = trainer.train_and_evaluate(tiny.get_config(), sys.argv[1] + "/run")
print("RESULT:", json.dumps({"test_accuracy": results["test_accuracy"], "devices": results["devices"]}))
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_one_and_four_devices_agree(tmp_path):
  single = trainer.train_and_evaluate(tiny.get_config(), tmp_path / "one")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICE_RUN, str(tmp_path)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  error = next(l for l in lines if l.startswith("ERROR:"))
  assert "train.batch_size=30" in error and "4 devices" in error
  four = json.loads(next(l for l in lines if l.startswith("RESULT:"))[len("RESULT:"):])
  assert four["devices"] == 4
  # Same math, different reduction order: equal within float tolerance, not bitwise.
  chex.assert_trees_all_close(_params(tmp_path / "one"), _params(tmp_path / "run"),
                              atol=2e-4, rtol=2e-3)
  assert abs(four["test_accuracy"] - single["test_accuracy"]) <= 0.01

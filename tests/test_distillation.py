"""Knowledge distillation: the loss against numpy, the T^2 scaling, the feature hint, a short run
on digits (loss down, agreement with the teacher up), resuming an interrupted run, config errors."""
from __future__ import annotations

import functools
import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from adcorda_jax.compression import distillation
from adcorda_jax.data import load_dataset
from adcorda_jax.errors import ConfigError
from adcorda_jax.models import create_model
from adcorda_jax.training import checkpointing, steps
from tests.helpers import data_config, one_line

NUM_CLASSES = 10


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_kl(student, teacher, temperature):
  """Mean over rows of KL(softmax(teacher / T) || softmax(student / T)), in float64."""
  log_p, log_q = _log_softmax(teacher / temperature), _log_softmax(student / temperature)
  return np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))


def _logits(seed, scale=2.0, shape=(6, NUM_CLASSES)):
  return np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32)


def _loss(student, teacher, labels, alpha, temperature):
  return distillation.distillation_loss(jnp.asarray(student), jnp.asarray(teacher),
                                        jnp.asarray(labels), num_classes=NUM_CLASSES,
                                        alpha=alpha, temperature=temperature)


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.5, 2.0), (0.9, 4.0), (1.0, 0.5)])
def test_loss_matches_numpy(alpha, temperature):
  student, teacher, labels = _logits(0), _logits(1), np.arange(6) % NUM_CLASSES
  ce = -np.mean(_log_softmax(student.astype(np.float64))[np.arange(6), labels])
  kl = _numpy_kl(student.astype(np.float64), teacher.astype(np.float64), temperature)
  loss, metrics = _loss(student, teacher, labels, alpha, temperature)
  np.testing.assert_allclose(float(metrics["cross_entropy"]), ce, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(loss), (1 - alpha) * ce + alpha * temperature**2 * kl,
                             rtol=1e-5)


@pytest.mark.slow
def test_temperature_squared_keeps_gradient_scale():
  student, teacher, labels = _logits(2, 0.5), _logits(3, 0.5), np.zeros(6, np.int32)
  for temperature in (1.0, 4.0):
    loss, _ = _loss(student, teacher, labels, 1.0, temperature)
    np.testing.assert_allclose(float(loss) / temperature**2,
                               _numpy_kl(student, teacher, temperature), rtol=1e-5)
  pure_ce, metrics = _loss(student, teacher, labels, 0.0, 4.0)
  assert float(pure_ce) == float(metrics["cross_entropy"])

  def grad_norm(temperature):
    grad = jax.grad(lambda s: _loss(s, teacher, labels, 1.0, temperature)[0])(jnp.asarray(student))
    return float(jnp.linalg.norm(grad))

  ratio = grad_norm(4.0) / grad_norm(1.0)
  assert 0.5 < ratio < 2.0, ratio  # Same order; without T^2 the ratio would be ~1/16.


def test_zero_kl_for_equal_logits_and_no_teacher_gradient():
  logits, labels = _logits(4), np.arange(6) % NUM_CLASSES
  _, metrics = _loss(logits, logits, labels, 0.9, 3.0)
  assert abs(float(metrics["kl"])) < 1e-6
  teacher_grad = jax.grad(lambda t: _loss(_logits(5), t, labels, 0.9, 3.0)[0])(jnp.asarray(logits))
  chex.assert_trees_all_equal(teacher_grad, jnp.zeros_like(teacher_grad))


def test_feature_loss_matches_numpy_and_trains_only_the_projection():
  rng = np.random.default_rng(6)
  student, teacher = rng.normal(size=(5, 3)), rng.normal(size=(5, 4))
  params = distillation.init_projection(jax.random.key(0), 3, 4)
  expected = np.mean((student @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
                      - teacher) ** 2)
  loss = distillation.feature_distillation_loss(jnp.asarray(student), jnp.asarray(teacher), params)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  identity = {"kernel": jnp.eye(4), "bias": jnp.zeros(4)}
  assert float(distillation.feature_distillation_loss(teacher, teacher, identity)) == 0.0
  teacher_grad = jax.grad(distillation.feature_distillation_loss, argnums=1)(
      jnp.asarray(student), jnp.asarray(teacher), params)
  assert not np.any(np.asarray(teacher_grad))


# --- Runs on digits: a width-0.5 teacher trained here, a width-0.25 student. ---

def _settings(**overrides) -> distillation.DistillSettings:
  section = {
      "epochs": 2, "batch_size": 32, "optimizer": "sgd", "learning_rate": 0.05,
      "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "schedule": "cosine",
      "warmup_epochs": 0.0, "alpha": 0.9, "temperature": 4.0, "beta": 0.5,
      "log_every_steps": 4, "checkpoint_every_steps": 8, "max_checkpoints": 2}
  section.update(overrides)  # Before ConfigDict, which would reject a value of another type.
  return distillation.read_distill_settings(ml_collections.ConfigDict({"distill": section}))


@pytest.fixture(scope="module")
def digits():
  return load_dataset(data_config(), seed=0)


def _model(dataset, width):
  return create_model(ml_collections.ConfigDict({"name": "small_cnn", "width": width}),
                      dataset.num_classes, dataset.mean, dataset.std)


def _predict(model, variables, images):
  return np.asarray(jnp.argmax(jax.jit(model.apply)(variables, images), -1))


@pytest.fixture(scope="module")
def teacher(digits):
  """A width-0.5 small CNN trained for 60 steps of plain cross-entropy (~90% on test)."""
  model = _model(digits, 0.5)
  tx = optax.sgd(0.05, momentum=0.9)
  state = steps.create_train_state(jax.random.key(0), model, digits.image_shape, tx)
  step = jax.jit(functools.partial(steps.train_step, num_classes=NUM_CLASSES))
  train = digits.train
  for index in range(60):
    rows = np.random.default_rng(index).choice(len(train), 64, replace=False)
    state, _ = step(state, {"image": train.images[rows], "label": train.labels[rows]},
                    jax.random.key(1))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  assert np.mean(_predict(model, variables, digits.test.images) == digits.test.labels) > 0.8
  return model, variables


TOTAL_STEPS, STEPS_PER_EPOCH, SUBSET = 32, 16, 512


@pytest.fixture(scope="module")
def distiller(digits, teacher):
  teacher_model, teacher_variables = teacher
  return distillation.Distiller(teacher_model, teacher_variables, _model(digits, 0.25),
                                _settings(), total_steps=TOTAL_STEPS,
                                steps_per_epoch=STEPS_PER_EPOCH, num_classes=NUM_CLASSES)


def _student_init(digits):
  return jax.device_get(_model(digits, 0.25).init(
      jax.random.key(7), jnp.zeros((1,) + digits.image_shape)))


def _run(distiller, digits, directory, **kwargs):
  data = (digits.train.images[:SUBSET], digits.train.labels[:SUBSET])
  return distiller.run(_student_init(digits), data, seed=0, directory=directory,
                       meta={"kind": "test"}, **kwargs)


@pytest.fixture(scope="module")
def finished(distiller, digits, tmp_path_factory):
  directory = tmp_path_factory.mktemp("distill")
  return directory, _run(distiller, digits, directory)


@pytest.mark.slow
def test_run_lowers_loss_and_raises_agreement(finished, distiller, digits, teacher):
  directory, result = finished
  log = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
  first, last = log[0], log[-1]
  assert [record["step"] for record in log] == list(range(4, TOTAL_STEPS + 1, 4))
  assert last["loss"] < 0.7 * first["loss"] and last["agreement"] > first["agreement"]
  assert first["feature"] > 0 and last["feature"] < first["feature"]  # The hint is on, trains.
  images = digits.test.images
  target = _predict(*teacher, images)
  student = distiller.student_model
  before = np.mean(_predict(student, _student_init(digits), images) == target)
  after = np.mean(_predict(student, result.variables, images) == target)
  assert after > max(before + 0.3, 0.6), (before, after)
  # The projection is dropped: the result and the checkpoint are a plain student.
  chex.assert_trees_all_equal_shapes(result.variables, _student_init(digits))
  loaded, meta = checkpointing.load_checkpoint(directory)
  assert meta == {"kind": "test"}
  chex.assert_trees_all_equal(loaded, result.variables)


class _Stop(Exception):
  pass


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_parameters(finished, distiller, digits, tmp_path):
  _, uninterrupted = finished

  def stop_at_step_11(step, state):
    if step == 11:
      raise _Stop

  with pytest.raises(_Stop):
    _run(distiller, digits, tmp_path, step_callback=stop_at_step_11)
  resumed = _run(distiller, digits, tmp_path)
  assert resumed.resumed_from_step == 8
  chex.assert_trees_all_equal(resumed.variables, uninterrupted.variables)  # Bitwise.
  calls = []
  again = _run(distiller, digits, tmp_path, step_callback=lambda *a: calls.append(a))
  assert calls == [] and again.resumed_from_step == TOTAL_STEPS
  chex.assert_trees_all_equal(again.variables, uninterrupted.variables)


@pytest.mark.slow
def test_logit_only_distillation_runs(digits, teacher, tmp_path):
  """beta=0: no projection, no teacher features; the student still moves and checkpoints."""
  teacher_model, teacher_variables = teacher
  runner = distillation.Distiller(teacher_model, teacher_variables, _model(digits, 0.25),
                                  _settings(beta=0.0, alpha=1.0), total_steps=3,
                                  steps_per_epoch=STEPS_PER_EPOCH, num_classes=NUM_CLASSES)
  result = _run(runner, digits, tmp_path)
  assert result.final_metrics["feature"] == 0.0 and result.final_metrics["kl"] > 0
  start = _student_init(digits)
  assert not np.array_equal(result.variables["params"]["classifier"]["kernel"],
                            start["params"]["classifier"]["kernel"])
  assert checkpointing.Checkpointer(tmp_path / "checkpoints").latest_step() == 3


@pytest.mark.parametrize("key,value,expected", [
    ("alpha", 1.5, "distill.alpha must be in [0, 1]"),
    ("alpha", -0.1, "distill.alpha must be >= 0"),
    ("temperature", 0.0, "distill.temperature must be > 0"),
    ("beta", -1.0, "distill.beta must be >= 0"),
    ("epochs", 0, "distill.epochs must be an integer > 0"),
    ("batch_size", 2.5, "distill.batch_size must be an integer"),
    ("learning_rate", "fast", "distill.learning_rate must be a finite number"),
    ("optimizer", "rmsprop", "distill.optimizer='rmsprop' is not valid"),
    ("schedule", "linear", "distill.schedule='linear' is not valid"),
    ("step_boundaries", (0.5, 1.5), "distill.step_boundaries must be fractions"),
    ("log_every_steps", 0, "distill.log_every_steps must be an integer > 0"),
])
def test_bad_config_values_name_their_key(key, value, expected):
  with pytest.raises(ConfigError) as error:
    _settings(**{key: value})
  assert expected in one_line(error)


def test_missing_section():
  with pytest.raises(ConfigError) as error:
    distillation.read_distill_settings(ml_collections.ConfigDict({"train": {}}))
  assert "'distill' section" in one_line(error)

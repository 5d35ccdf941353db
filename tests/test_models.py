"""Tests for adcorda_jax.models: shapes, BN state, normalization, param counts, config errors."""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from adcorda_jax.errors import ConfigError
from adcorda_jax.models import MODELS, count_params, create_model

ALL_NAMES = ["resnet110", "resnet18", "resnet20", "resnet32", "resnet34", "resnet56", "small_cnn"]
BATCH = 4


def _model(name: str, channels: int, num_classes: int = 10, **fields):
  config = ml_collections.ConfigDict({"name": name, **fields})
  return create_model(config, num_classes, mean=[0.4] * channels, std=[0.25] * channels)


def _images(size: int, channels: int, seed: int = 0, batch: int = BATCH) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, channels), jnp.float32)


@functools.lru_cache(maxsize=None)
def _initialized(name: str, size: int, channels: int):
  """(model, variables, images) for one forward-pass case; cached across tests."""
  model = _model(name, channels)
  images = _images(size, channels)
  return model, model.init(jax.random.key(1), images), images


def _shapes(name: str, channels: int, size: int, num_classes: int = 10, **fields):
  model = _model(name, channels, num_classes, **fields)
  images = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# (name, image size, channels, feature dimension)
FORWARD_CASES = [
    ("small_cnn", 8, 1, 128),
    ("small_cnn", 28, 1, 128),
    ("small_cnn", 32, 3, 128),
    pytest.param("resnet20", 32, 3, 64, marks=pytest.mark.slow),
    pytest.param("resnet20", 28, 1, 64, marks=pytest.mark.slow),
    pytest.param("resnet18", 64, 3, 512, marks=pytest.mark.slow),
]


def test_registry_has_all_models():
  assert MODELS.names() == ALL_NAMES
  assert MODELS.kind == "model"


@pytest.mark.parametrize("name,size,channels,feature_dim", FORWARD_CASES)
def test_forward_shapes_and_features(name, size, channels, feature_dim):
  model, variables, images = _initialized(name, size, channels)
  assert set(variables) == {"params", "batch_stats"}
  logits = model.apply(variables, images)
  logits_again, features = model.apply(variables, images, return_features=True)
  chex.assert_shape(logits, (BATCH, 10))
  chex.assert_shape(features, (BATCH, feature_dim))
  chex.assert_type([logits, features], jnp.float32)
  chex.assert_tree_all_finite((logits, features))
  np.testing.assert_allclose(logits_again, logits, rtol=1e-6, atol=1e-6)
  # Eval mode is deterministic and uses no rng, even with dropout configured.
  np.testing.assert_array_equal(model.apply(variables, images), logits)


@pytest.mark.parametrize("name,size,channels,feature_dim", FORWARD_CASES)
def test_train_mode_updates_batch_stats(name, size, channels, feature_dim):
  model, variables, images = _initialized(name, size, channels)
  (logits, features), updates = model.apply(
      variables, images, train=True, return_features=True, mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(2)})
  chex.assert_shape(logits, (BATCH, 10))
  chex.assert_shape(features, (BATCH, feature_dim))
  chex.assert_tree_all_finite(updates)
  assert set(updates) == {"batch_stats"}
  chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])
  changed = jax.tree_util.tree_map(lambda new, old: bool(jnp.any(new != old)),
                                   updates["batch_stats"], variables["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))


def test_dropout_uses_rng_only_in_training():
  model = _model("small_cnn", 1, dropout=0.5)
  images = _images(28, 1)
  variables = model.init(jax.random.key(0), images)

  def train_logits(seed):
    logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(seed)})
    return logits

  assert not np.allclose(train_logits(3), train_logits(4))
  np.testing.assert_array_equal(model.apply(variables, images), model.apply(variables, images))


# Exact counts of trainable parameters. References: torchvision resnet18/34 (1000 classes) have
# 11,689,512 / 21,797,672; option-A ResNet-20 has 269,722, and the two 1x1+BN projections add
# 16*32 + 2*32 + 32*64 + 2*64 = 2,752.
@pytest.mark.parametrize("name,num_classes,size,expected", [
    ("small_cnn", 10, 28, 468_010),
    ("small_cnn", 10, 8, 197_674),
    ("resnet20", 10, 32, 272_474),
    ("resnet32", 10, 32, 466_906),
    ("resnet56", 10, 32, 855_770),
    ("resnet110", 10, 32, 1_730_714),
    ("resnet18", 1000, 224, 11_689_512),
    ("resnet18", 10, 64, 11_181_642),
    ("resnet34", 1000, 224, 21_797_672),
])
def test_parameter_counts(name, num_classes, size, expected):
  channels = 1 if name == "small_cnn" else 3
  assert count_params(_shapes(name, channels, size, num_classes)["params"]) == expected


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "resnet18"])
def test_half_width_quarters_parameters(name):
  full = count_params(_shapes(name, 3, 64)["params"])
  half = count_params(_shapes(name, 3, 64, width=0.5)["params"])
  assert 3.7 < full / half < 4.1


def test_channels_are_readable_from_parameter_shapes():
  params = _shapes("resnet20", 3, 32, width=0.3)["params"]
  assert params["conv1"]["kernel"].shape == (3, 3, 3, 5)  # round(16 * 0.3)
  assert params["stage2_block0"]["conv1"]["kernel"].shape == (3, 3, 5, 10)
  assert params["stage2_block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 5, 10)
  assert params["stage3_block2"]["bn2"]["scale"].shape == (19,)
  assert "shortcut_conv" not in params["stage1_block0"]
  # small_cnn pools twice on 28x28 (7x7x64 flattened) but only once on 8x8 (4x4x64).
  assert _shapes("small_cnn", 1, 28)["params"]["hidden"]["kernel"].shape == (7 * 7 * 64, 128)
  assert _shapes("small_cnn", 1, 8)["params"]["hidden"]["kernel"].shape == (4 * 4 * 64, 128)
  tiny = _shapes("small_cnn", 1, 28, width=0.01)["params"]
  assert tiny["conv1"]["kernel"].shape[-1] == 1 and tiny["hidden"]["kernel"].shape[-1] == 1


def test_count_params_matches_on_arrays_and_shapes():
  model, variables, _ = _initialized("small_cnn", 28, 1)
  assert count_params(variables["params"]) == count_params(_shapes("small_cnn", 1, 28)["params"])
  assert count_params({}) == 0


@pytest.mark.parametrize("name,channels", [("small_cnn", 1),
                                           pytest.param("resnet20", 3, marks=pytest.mark.slow)])
def test_normalization_happens_inside_the_model(name, channels):
  mean, std = [0.2, 0.5, 0.7][:channels], [0.3, 0.25, 0.4][:channels]
  config = ml_collections.ConfigDict({"name": name})
  normalizing = create_model(config, 10, mean=mean, std=std)
  identity = create_model(config, 10, mean=[0.0], std=[1.0])
  images = _images(28, channels, seed=5)
  variables = normalizing.init(jax.random.key(0), images)
  expected = identity.apply(variables, (images - jnp.array(mean)) / jnp.array(std))
  np.testing.assert_allclose(normalizing.apply(variables, images), expected, rtol=1e-4, atol=1e-4)
  assert normalizing.mean == tuple(mean) and normalizing.std == tuple(std)


def test_bad_inputs_are_rejected():
  model, variables, images = _initialized("small_cnn", 28, 1)
  with pytest.raises(TypeError, match="float images"):
    model.apply(variables, (images * 255).astype(jnp.uint8))
  three_channel = create_model(ml_collections.ConfigDict({"name": "small_cnn"}), 10,
                               mean=[0.5] * 3, std=[0.5] * 3)
  with pytest.raises(ValueError, match="mean has 3 values"):
    three_channel.init(jax.random.key(0), images)
  with pytest.raises(ValueError, match="std"):
    create_model(ml_collections.ConfigDict({"name": "small_cnn"}), 10, mean=[0.5], std=[0.0])


def _config_error(fields, num_classes=10) -> str:
  with pytest.raises(ConfigError) as info:
    create_model(ml_collections.ConfigDict(fields), num_classes, mean=[0.5], std=[0.5])
  message = str(info.value)
  assert "\n" not in message
  return message


def test_unknown_or_missing_name_lists_valid_names():
  for fields in ({"name": "resnet21"}, {"width": 1.0}):
    message = _config_error(fields)
    assert "model.name" in message
    assert all(name in message for name in ALL_NAMES)


@pytest.mark.parametrize("fields,key", [
    ({"name": "resnet20", "width": 0.0}, "model.width"),
    ({"name": "resnet20", "width": -1.0}, "model.width"),
    ({"name": "small_cnn", "width": "wide"}, "model.width"),
    ({"name": "small_cnn", "width": True}, "model.width"),
    ({"name": "small_cnn", "width": float("nan")}, "model.width"),
    ({"name": "small_cnn", "dropout": 1.0}, "model.dropout"),
    ({"name": "small_cnn", "dropout": -0.1}, "model.dropout"),
])
def test_invalid_fields_name_their_key(fields, key):
  assert key in _config_error(fields)


def test_invalid_num_classes():
  assert "num_classes" in _config_error({"name": "small_cnn"}, num_classes=1)


def test_defaults_and_resnet_accepts_dropout_setting():
  model = create_model(ml_collections.ConfigDict({"name": "small_cnn"}), 3, [0.5], [0.5])
  assert (model.width, model.dropout) == (1.0, 0.0)
  # A Fashion-MNIST config with small_cnn dropout switched to resnet20 must still build.
  resnet = create_model(ml_collections.ConfigDict({"name": "resnet20", "dropout": 0.25}), 10,
                        [0.5], [0.5])
  assert resnet.width == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name,size,channels", [("small_cnn", 28, 1), ("resnet20", 32, 3)])
def test_one_sgd_step_lowers_cross_entropy(name, size, channels):
  model = _model(name, channels)
  images = _images(size, channels, seed=7, batch=16)
  labels = jax.random.randint(jax.random.key(8), (16,), 0, 10)
  variables = model.init(jax.random.key(0), images)

  @jax.jit
  def loss_fn(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                            train=True, mutable=["batch_stats"])
    return _cross_entropy(logits, labels)

  optimizer = optax.sgd(0.01)
  params = variables["params"]
  loss, grads = jax.value_and_grad(loss_fn)(params)
  chex.assert_tree_all_finite(grads)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  new_loss = loss_fn(optax.apply_updates(params, updates))
  assert float(new_loss) < float(loss)

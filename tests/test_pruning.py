"""Tests for adcorda_jax.compression: filter pruning, magnitude pruning, the pruning optimizer."""
from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from adcorda_jax.compression import (apply_masks, count_parameters, flops_per_example,
                                     l1_filter_prune, magnitude_masks, masked_optimizer,
                                     nonzero_parameters, polynomial_sparsity, pruning_masks,
                                     pruning_optimizer, size_bytes, sparsity_report)
from adcorda_jax.errors import ConfigError
from adcorda_jax.models import count_params, create_model, model_channels
from adcorda_jax.training.steps import create_train_state, train_step
from tests.helpers import one_line

# name -> (model config, image shape): tiny models so the whole file stays fast on 2 cores.
CASES = {
    "small_cnn": ({"name": "small_cnn", "width": 0.5}, (8, 8, 1)),
    "resnet20": ({"name": "resnet20", "width": 0.5}, (8, 8, 3)),
}
NUM_CLASSES = 10


def _create(config: dict, image_shape):
  channels = image_shape[-1]
  return create_model(ml_collections.ConfigDict(config), NUM_CLASSES, mean=(0.4,) * channels,
                      std=(0.3,) * channels)


def _images(image_shape, seed: int = 0, batch: int = 4) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), (batch,) + tuple(image_shape), jnp.float32)


def _randomize_batch_norm(variables, seed: int):
  """Random BN scale/bias and positive running statistics, so eval mode is not an identity."""
  keys = iter(jax.random.split(jax.random.key(seed), 1000))

  def change(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == "mean":
      return 0.5 * jax.random.normal(next(keys), shape)
    if name == "var":
      return jax.random.uniform(next(keys), shape, minval=0.5, maxval=2.0)
    if name == "scale":
      return jax.random.uniform(next(keys), shape, minval=0.5, maxval=1.5)
    if name == "bias" and "bn" in jax.tree_util.keystr(path):
      return 0.3 * jax.random.normal(next(keys), shape)
    return leaf

  return jax.tree_util.tree_map_with_path(change, variables)


@functools.lru_cache(maxsize=None)
def _setup(name: str):
  """(config, model, variables with non-trivial BatchNorm, images) for one tiny model."""
  config, image_shape = CASES[name]
  model = _create(config, image_shape)
  images = _images(image_shape)
  variables = _randomize_batch_norm(model.init(jax.random.key(1), images), seed=2)
  return config, model, variables, images


def _get(tree, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _l1_kept(kernel, ratio: float) -> np.ndarray:
  """Independent reference: indices of the filters with the largest L1 norms, sorted."""
  norms = np.abs(np.asarray(kernel)).sum(axis=tuple(range(kernel.ndim - 1)))
  keep = len(norms) - math.floor(ratio * len(norms))
  return np.sort(np.argsort(-norms, kind="stable")[:keep])


# ---------------------------------------------------------------------------------------------
# Models with pruned channel counts.


def test_model_channels_defaults_and_overrides():
  assert model_channels("small_cnn", {"width": 0.5}) == (16, 16, 32, 32)
  assert model_channels("resnet20", {"width": 0.5}) == (8,) * 3 + (16,) * 3 + (32,) * 3
  assert len(model_channels("resnet18", {})) == 8
  assert model_channels("small_cnn", {"channels": (3, 4, 5, 6)}) == (3, 4, 5, 6)
  # Default widths written out explicitly build the very same parameter tree.
  config, image_shape = CASES["resnet20"]
  images = jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32)
  shapes = [jax.eval_shape(_create(fields, image_shape).init, jax.random.key(0), images)
            for fields in (config, dict(config, channels=model_channels("resnet20", config)))]
  assert jax.tree.map(lambda s: s.shape, shapes[0]) == jax.tree.map(lambda s: s.shape, shapes[1])


@pytest.mark.parametrize("channels,expected", [
    ((8, 8, 16), 4), ((8, 8, 16, 16, 1), 4), ((8, 0, 16, 16), 4), ((8, True, 16, 16), 4),
    ("8,8,16,16", 4), ((8, 8, 16.0, 16), 4),
])
def test_bad_channels_are_one_line_config_errors(channels, expected):
  with pytest.raises(ConfigError) as info:
    _create({"name": "small_cnn", "channels": channels}, (8, 8, 1))
  message = one_line(info)
  assert "model.channels" in message and f"{expected} positive integers" in message
  with pytest.raises(ConfigError, match="model.channels.*9 positive"):
    _create({"name": "resnet20", "channels": (4,) * 8}, (8, 8, 3))


# ---------------------------------------------------------------------------------------------
# L1 filter pruning.


@pytest.mark.slow
@pytest.mark.parametrize("name,ratio,expected", [
    ("small_cnn", 0.5, (8, 8, 16, 16)),
    ("small_cnn", (0.25, 0.5, 0.3, 0.0), (12, 8, 23, 32)),  # floor(0.3 * 32) = 9 removed.
    ("resnet20", 0.5, (4,) * 3 + (8,) * 3 + (16,) * 3),
    ("resnet20", 0.7, (3,) * 3 + (5,) * 3 + (10,) * 3),  # floor(0.7 * 8) = 5, ...
])
def test_filter_pruning_shrinks_channels_parameters_and_flops(name, ratio, expected):
  config, model, variables, images = _setup(name)
  new_config, new_variables = l1_filter_prune(config, variables, ratio)
  assert new_config["channels"] == expected
  assert {k: v for k, v in new_config.items() if k != "channels"} == config
  assert model_channels(name, new_config) == expected
  pruned = _create(new_config, CASES[name][1])
  for layer, width in zip(pruned.prunable_convs(), expected):
    assert _get(new_variables["params"], layer.conv)["kernel"].shape[-1] == width
    assert _get(new_variables["batch_stats"], layer.bn)["var"].shape == (width,)
  # The pruned module's own init has exactly the shapes pruning produced.
  init_shapes = jax.eval_shape(pruned.init, jax.random.key(0), images)
  assert jax.tree.map(jnp.shape, init_shapes) == jax.tree.map(jnp.shape, new_variables)
  assert count_parameters(new_variables["params"]) < count_params(variables["params"])
  image_shape = CASES[name][1]
  assert flops_per_example(pruned, new_variables, image_shape) < \
      flops_per_example(model, variables, image_shape)


@pytest.mark.slow
def test_resnet_block_outputs_and_shortcuts_keep_their_width():
  config, _, variables, _ = _setup("resnet20")
  _, new_variables = l1_filter_prune(config, variables, 0.5)
  params, old = new_variables["params"], variables["params"]
  for path in ("conv1", "stage2_block0/conv2", "stage2_block0/shortcut_conv",
               "stage3_block2/conv2", "classifier"):
    assert _get(params, path)["kernel"].shape[-1] == _get(old, path)["kernel"].shape[-1]
  assert params["stage2_block0"]["conv2"]["kernel"].shape == (3, 3, 8, 16)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_pruned_model_equals_original_with_pruned_channels_zeroed(name):
  """Before fine-tuning, the narrow network computes exactly the masked original (eval mode)."""
  config, model, variables, images = _setup(name)
  ratio = 0.4
  new_config, new_variables = l1_filter_prune(config, variables, ratio)
  masked = jax.tree.map(np.array, variables)  # Writable numpy copies.
  for layer in model.prunable_convs():
    kernel = _get(variables["params"], layer.conv)["kernel"]
    channels = kernel.shape[-1]
    removed = np.setdiff1d(np.arange(channels), _l1_kept(kernel, ratio))
    assert removed.size == math.floor(ratio * channels)
    next_kernel = _get(masked["params"], layer.next_layer)["kernel"]
    if next_kernel.ndim == 4:
      next_kernel[:, :, removed, :] = 0.0
    else:  # The flattened (H, W, C) input of small_cnn's `hidden` Dense.
      next_kernel.reshape(-1, channels, next_kernel.shape[-1])[:, removed, :] = 0.0
  pruned_logits = _create(new_config, CASES[name][1]).apply(new_variables, images)
  masked_logits = model.apply(masked, images)
  np.testing.assert_allclose(pruned_logits, masked_logits, rtol=1e-5, atol=1e-5)
  # The pruned channels did matter (BN biases make them nonzero), so the check has teeth.
  assert not np.allclose(model.apply(variables, images), masked_logits, atol=1e-3)


def test_kept_filters_have_the_largest_l1_norms():
  config, model, variables, _ = _setup("small_cnn")
  ratio = 0.5
  _, new_variables = l1_filter_prune(config, variables, ratio)
  kept_inputs = np.arange(1)  # conv1 sees the single gray channel.
  for layer in model.prunable_convs():
    kernel = np.asarray(_get(variables["params"], layer.conv)["kernel"])
    norms = np.abs(kernel).sum(axis=(0, 1, 2))
    kept = _l1_kept(kernel, ratio)
    removed = np.setdiff1d(np.arange(kernel.shape[-1]), kept)
    assert norms[kept].min() >= norms[removed].max()
    # Kept filters stay in their original order (inputs cut by the previous layer's pruning),
    # and so do their BN entries.
    np.testing.assert_array_equal(_get(new_variables["params"], layer.conv)["kernel"],
                                  kernel[:, :, kept_inputs, :][..., kept])
    old_mean = np.asarray(_get(variables["batch_stats"], layer.bn)["mean"])
    np.testing.assert_array_equal(_get(new_variables["batch_stats"], layer.bn)["mean"],
                                  old_mean[kept])
    kept_inputs = kept


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, (0.5, 0.5), "half", (0.1, 0.2, 1.0, 0.0)])
def test_bad_ratios_are_one_line_value_errors(ratio):
  config, _, variables, _ = _setup("small_cnn")
  with pytest.raises(ValueError) as info:
    l1_filter_prune(config, variables, ratio)
  message = one_line(info)
  assert "ratio" in message
  if ratio in (1.0, -0.1, 1.5):
    assert repr(ratio) in message


def test_pruning_variables_of_another_model_is_rejected():
  config, _, variables, _ = _setup("small_cnn")
  with pytest.raises(ValueError, match="conv1 has 16 filters but the config says 32"):
    l1_filter_prune(dict(config, width=1.0), variables, 0.5)


# ---------------------------------------------------------------------------------------------
# Magnitude pruning.


def _kernel_arrays(tree) -> dict[str, np.ndarray]:
  report = sparsity_report(tree)
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return {path: flat[path] for path in report if path != "total"}


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_global_masks_prune_the_smallest_magnitudes_over_all_layers(sparsity):
  params = _setup("small_cnn")[2]["params"]
  masks = magnitude_masks(params, sparsity, scope="global")
  assert jax.tree.structure(masks) == jax.tree.structure(params)
  weights, kept = _kernel_arrays(params), _kernel_arrays(masks)
  total = sum(w.size for w in weights.values())
  pruned = sum(int((m == 0).sum()) for m in kept.values())
  assert pruned == round(sparsity * total)
  magnitudes = {path: np.abs(w) for path, w in weights.items()}
  largest_pruned = max(magnitudes[p][kept[p] == 0].max() for p in weights if (kept[p] == 0).any())
  smallest_kept = min(magnitudes[p][kept[p] == 1].min() for p in weights if (kept[p] == 1).any())
  assert largest_pruned <= smallest_kept
  # Layers end up with different sparsities: the ranking really is global.
  layer_sparsity = [float((m == 0).mean()) for m in kept.values()]
  assert max(layer_sparsity) - min(layer_sparsity) > 0.05
  # Biases and BatchNorm parameters are never masked.
  np.testing.assert_array_equal(masks["bn1"]["bias"], 1.0)
  np.testing.assert_array_equal(masks["hidden"]["bias"], 1.0)
  report = sparsity_report(apply_masks(params, masks))
  assert report["total"]["zeros"] == pruned and report["total"]["size"] == total


@pytest.mark.slow
def test_layer_masks_prune_every_kernel_to_the_sparsity():
  params = _setup("resnet20")[2]["params"]
  masks = magnitude_masks(params, 0.6, scope="layer")
  weights = _kernel_arrays(params)
  for path, mask in _kernel_arrays(masks).items():
    assert int((mask == 0).sum()) == round(0.6 * mask.size), path
    magnitudes = np.abs(weights[path])
    assert magnitudes[mask == 0].max() <= magnitudes[mask == 1].min()


def test_polynomial_schedule_is_monotone_and_reaches_the_final_sparsity():
  kwargs = dict(final_sparsity=0.9, begin_step=10, end_step=50, initial_sparsity=0.1)
  values = np.asarray(jax.jit(
      lambda s: polynomial_sparsity(s, **kwargs))(jnp.arange(70)))
  assert np.all(np.diff(values) >= 0)
  np.testing.assert_allclose(values[:11], 0.1, atol=1e-7)
  np.testing.assert_allclose(values[50:], 0.9, atol=1e-7)
  assert 0.1 < values[30] < 0.9
  # Zhu & Gupta: s_t = s_f + (s_i - s_f) (1 - progress)^3.
  np.testing.assert_allclose(values[30], 0.9 - 0.8 * 0.5 ** 3, rtol=1e-6)
  assert float(polynomial_sparsity(0, final_sparsity=0.5, begin_step=0, end_step=0)) == 0.5


def _train(tx, steps: int):
  """`steps` jitted SGD steps of small_cnn through `tx`; returns the params after every step."""
  config, image_shape = CASES["small_cnn"]
  model = _create(config, image_shape)
  state = create_train_state(jax.random.key(3), model, image_shape, tx)
  state = state.replace(params=apply_masks(state.params, pruning_masks(state.opt_state)))
  step = jax.jit(functools.partial(train_step, num_classes=NUM_CLASSES))
  batch = {"image": _images(image_shape, seed=4, batch=16),
           "label": jax.random.randint(jax.random.key(5), (16,), 0, NUM_CLASSES)}
  history = [state.params]
  for _ in range(steps):
    state, metrics = step(state, batch, jax.random.key(6))
    assert np.isfinite(float(metrics["loss"]))
    history.append(state.params)
  return history, pruning_masks(state.opt_state)


def _fixed_masks(scope: str):
  """One-shot masks of the params `_train` starts from."""
  config, image_shape = CASES["small_cnn"]
  model = _create(config, image_shape)
  params = create_train_state(jax.random.key(3), model, image_shape, optax.sgd(0.1)).params
  return magnitude_masks(params, 0.5, scope)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,scope", [("masked", "global"), ("pruning", "layer")])
def test_one_shot_masks_hold_through_momentum_training_steps(optimizer, scope):
  sgd = optax.sgd(0.05, momentum=0.9)
  if optimizer == "masked":
    masks = _fixed_masks(scope)
    tx = masked_optimizer(sgd, masks)
  else:
    tx = pruning_optimizer(sgd, final_sparsity=0.5, scope=scope)
  history, state_masks = _train(tx, steps=4)
  if optimizer == "masked":  # Fixed masks stay as given.
    chex.assert_trees_all_equal(state_masks, masks)
  start, end = _kernel_arrays(history[0]), _kernel_arrays(history[-1])
  kept = _kernel_arrays(state_masks)
  total = sum(m.size for m in kept.values())
  assert sum(int((m == 0).sum()) for m in kept.values()) == round(0.5 * total)
  for path, mask in kept.items():
    for params in history:
      assert np.all(_kernel_arrays(params)[path][mask == 0] == 0.0), path
    assert np.any(end[path][mask == 1] != start[path][mask == 1]), path
  assert sparsity_report(history[-1])["total"]["sparsity"] == pytest.approx(0.5, abs=1e-4)


@pytest.mark.slow
def test_gradual_pruning_follows_the_schedule_and_never_regrows():
  schedule = dict(final_sparsity=0.8, begin_step=1, end_step=5)
  tx = pruning_optimizer(optax.sgd(0.05, momentum=0.9), update_every=2, **schedule)
  history, _ = _train(tx, steps=7)
  sparsities = [sparsity_report(params)["total"]["sparsity"] for params in history]
  # Masks change at steps 1, 3 and 5 (params after step t are history[t + 1]).
  expected = [0.0, 0.0, 0.0, 0.0, 0.7, 0.7, 0.8, 0.8]
  np.testing.assert_allclose(sparsities, expected, atol=1e-4)
  for before, after in zip(history, history[1:]):
    for path, weights in _kernel_arrays(before).items():
      assert np.all(_kernel_arrays(after)[path][weights == 0] == 0), path


def test_bad_magnitude_arguments_are_one_line_value_errors():
  params = _setup("small_cnn")[2]["params"]
  with pytest.raises(ValueError) as info:
    magnitude_masks(params, 0.5, scope="channel")
  assert "'channel'" in one_line(info) and "global, layer" in one_line(info)
  for call in (lambda: magnitude_masks(params, 1.5),
               lambda: pruning_optimizer(optax.sgd(0.1), final_sparsity=0.5, scope="row"),
               lambda: pruning_optimizer(optax.sgd(0.1), final_sparsity=-0.1),
               lambda: pruning_optimizer(optax.sgd(0.1), final_sparsity=0.5, update_every=0),
               lambda: pruning_optimizer(optax.sgd(0.1), final_sparsity=0.5, begin_step=5,
                                         end_step=2),
               lambda: masked_optimizer(optax.sgd(0.1), {"kernel": np.ones((2, 2))}).init(params)):
    with pytest.raises(ValueError) as info:
      call()
    one_line(info)


# ---------------------------------------------------------------------------------------------
# Model statistics.


def test_parameter_counts_and_sizes():
  params = _setup("small_cnn")[2]["params"]
  total = count_params(params)
  assert count_parameters(params) == total
  assert size_bytes(params) == 4 * total
  sparse = apply_masks(params, magnitude_masks(params, 0.75))
  nonzero = nonzero_parameters(sparse)
  kernel_sizes = sparsity_report(params)["total"]["size"]
  # Zero-initialized biases are zeros too; kernels lose 3/4 of their weights.
  assert nonzero <= total - round(0.75 * kernel_sizes)
  assert size_bytes(sparse, sparse=True) == 4 * nonzero + math.ceil(total / 8)
  assert size_bytes(sparse, sparse=True) < size_bytes(sparse) / 3


def test_flops_of_a_dense_layer():
  import flax.linen as nn

  class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      return nn.Dense(3, use_bias=False)(x.reshape((x.shape[0], -1)))

  model = Linear()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 4)))
  # One [1, 16] x [16, 3] matmul: 16 * 3 multiply-adds = 96 FLOPs.
  assert flops_per_example(model, variables, (2, 2, 4)) == pytest.approx(96, rel=0.1)

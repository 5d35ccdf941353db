"""Tests for adcorda_jax.quant: fake quantization, calibration, quantized models, integer export."""
from __future__ import annotations

import functools
import math
import zlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adcorda_jax.errors import ConfigError
from adcorda_jax.models import create_model
from adcorda_jax.quant import (QuantSpec, activation_spec_from_config, calibrate_activations,
                               calibrate_tensor, calibrate_weights, compute_scale,
                               export_integer_weights, fake_quantize, fake_quantize_params,
                               fold_batch_norm, import_integer_weights, model_size_bytes,
                               quant_range, quant_spec_from_config, quantize_dequantize,
                               quantized_apply_fn, quantized_logits_fn)
from adcorda_jax.quant.export import pack_bits, unpack_bits
from adcorda_jax.quant.fake_quant import quantize
from tests.helpers import one_line

SMALL_CNN_LAYERS = {"conv1", "conv2", "conv3", "conv4", "hidden", "classifier"}


@functools.lru_cache(maxsize=None)
def _setup(name: str = "small_cnn"):
  """(model, variables with nontrivial BN parameters and statistics, images 8x8x1)."""
  model = create_model(ml_collections.ConfigDict({"name": name, "width": 0.25}), 10, (0.5,),
                       (0.25,))
  images = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1), jnp.float32)
  variables = model.init(jax.random.key(1), images)

  def randomize(path, leaf):
    key = jax.random.fold_in(jax.random.key(2), zlib.crc32(jax.tree_util.keystr(path).encode()))
    name = jax.tree_util.keystr(path[-1:], simple=True)
    if name == "var":
      return jax.random.uniform(key, leaf.shape, minval=0.3, maxval=3.0)
    if name in ("mean", "bias"):
      return 0.5 * jax.random.normal(key, leaf.shape)
    if name == "scale":
      return jax.random.uniform(key, leaf.shape, minval=0.5, maxval=2.0)
    return leaf

  return model, jax.tree_util.tree_map_with_path(randomize, variables), images


def _kernel_like(seed: int, shape=(3, 3, 2, 4)) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# --- fake quantization ---------------------------------------------------------------------------

@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), symmetric=st.booleans(), per_channel=st.booleans(),
       seed=st.integers(0, 2**16), log_magnitude=st.floats(-3.0, 3.0))
def test_quantize_dequantize_error_is_at_most_half_a_step(bits, symmetric, per_channel, seed,
                                                          log_magnitude):
  spec = QuantSpec(bits, per_channel, symmetric)
  channel_scales = jnp.asarray([1.0, 0.01, 3.0, 0.3]) * 10.0 ** log_magnitude
  x = _kernel_like(seed) * channel_scales + (0.0 if symmetric else 0.5 * channel_scales)
  scale, _ = compute_scale(x, spec)
  error = jnp.abs(quantize_dequantize(x, spec) - x)
  assert bool(jnp.all(error <= 0.5 * scale * (1 + 1e-5)))


def test_exact_values_per_tensor_symmetric_4bit():
  spec = QuantSpec(4, per_channel=False, symmetric=True)
  x = jnp.asarray([1.75, -0.625, 0.375, 0.1, -1.0])  # Steps of 0.25; -2.5 and 1.5 round to even.
  scale, zero_point = compute_scale(x, spec)
  chex.assert_trees_all_equal((scale, zero_point), (jnp.asarray([0.25]), jnp.asarray([0.0])))
  chex.assert_trees_all_equal(quantize_dequantize(x, spec),
                              jnp.asarray([1.75, -0.5, 0.5, 0.0, -1.0]))


def test_exact_values_per_tensor_asymmetric_4bit():
  spec = QuantSpec(4, per_channel=False, symmetric=False)
  x = jnp.asarray([-0.5, 0.0, 0.3, 0.2, 1.375])  # Range 1.875 / 15 = 0.125; 0 maps to code 4.
  scale, zero_point = compute_scale(x, spec)
  chex.assert_trees_all_equal((scale, zero_point), (jnp.asarray([0.125]), jnp.asarray([4.0])))
  chex.assert_trees_all_equal(quantize(x, scale, zero_point, 0, 15),
                              jnp.asarray([0.0, 4.0, 6.0, 6.0, 15.0]))
  chex.assert_trees_all_equal(quantize_dequantize(x, spec),
                              jnp.asarray([-0.5, 0.0, 0.25, 0.25, 1.375]))


def test_exact_values_per_channel_symmetric_4bit():
  spec = QuantSpec(4, per_channel=True, symmetric=True)
  x = jnp.asarray([[0.875, 3.0], [-0.3125, -14.0]])  # [in, out]: scales 0.125 and 2.
  scale, _ = compute_scale(x, spec)
  chex.assert_trees_all_equal(scale, jnp.asarray([[0.125, 2.0]]))
  chex.assert_trees_all_equal(quantize_dequantize(x, spec),
                              jnp.asarray([[0.875, 4.0], [-0.25, -14.0]]))


def test_quant_range():
  assert quant_range(8, True) == (-127, 127)
  assert quant_range(8, False) == (0, 255)
  assert quant_range(4, True) == (-7, 7)
  assert quant_range(2, False) == (0, 3)


@pytest.mark.parametrize("bits,symmetric,scale,zero_point,low,high", [
    (4, True, 0.1, 0.0, -0.7, 0.7),
    (3, False, 0.25, 3.0, -0.75, 1.0),
])
def test_straight_through_gradient_is_one_inside_and_zero_outside(bits, symmetric, scale,
                                                                  zero_point, low, high):
  qmin, qmax = quant_range(bits, symmetric)
  x = jnp.arange(-20, 21, dtype=jnp.float32) * 0.1 + 0.03  # Never on a range boundary.
  scale, zero_point = jnp.float32(scale), jnp.float32(zero_point)

  def loss(x, s, z):
    return jnp.sum(fake_quantize(x, s, z, qmin, qmax))

  grad_x, grad_scale, grad_zero_point = jax.grad(loss, argnums=(0, 1, 2))(x, scale, zero_point)
  inside = (x >= low) & (x <= high)
  assert 0 < int(inside.sum()) < x.size
  chex.assert_trees_all_equal(grad_x, jnp.where(inside, 1.0, 0.0))
  assert float(grad_scale) == 0.0 and float(grad_zero_point) == 0.0


def test_per_channel_scales_follow_output_channels():
  magnitudes = jnp.asarray([1e-3, 1.0, 10.0, 100.0])
  kernel = _kernel_like(3) * magnitudes  # HWIO: the last axis is the output channel.
  spec = QuantSpec(8, per_channel=True, symmetric=True)
  scale, zero_point = compute_scale(kernel, spec)
  assert scale.shape == (1, 1, 1, 4)
  assert len(np.unique(np.asarray(scale))) == 4
  max_abs = jnp.max(jnp.abs(kernel), axis=(0, 1, 2))
  np.testing.assert_allclose(scale.reshape(-1), max_abs / 127, rtol=1e-6)
  codes = quantize(kernel, scale, zero_point, -127, 127).reshape(-1, 4)
  flat = kernel.reshape(-1, 4)
  argmax = jnp.argmax(jnp.abs(flat), axis=0)
  chex.assert_trees_all_equal(jnp.abs(codes[argmax, jnp.arange(4)]), jnp.full((4,), 127.0))
  # A per-tensor grid would zero out the small channel entirely; per-channel keeps it.
  per_tensor = quantize_dequantize(kernel, QuantSpec(8, False, True))
  assert float(jnp.max(jnp.abs(per_tensor[..., 0]))) == 0.0
  assert float(jnp.max(jnp.abs(quantize_dequantize(kernel, spec)[..., 0]))) > 0.0


def test_all_zero_channel_gets_a_nonzero_scale():
  kernel = _kernel_like(4).at[..., 1].set(0.0)
  for symmetric in (True, False):
    spec = QuantSpec(4, True, symmetric)
    scale, _ = compute_scale(kernel, spec)
    assert bool(jnp.all(scale > 0))
    restored = quantize_dequantize(kernel, spec)
    assert bool(jnp.all(jnp.isfinite(restored))) and float(jnp.abs(restored[..., 1]).max()) == 0


# --- calibration ---------------------------------------------------------------------------------

def _heavy_tailed(seed: int = 5) -> jax.Array:
  """Gaussian weights [64, 16] with one large outlier per output channel."""
  x = jax.random.normal(jax.random.key(seed), (64, 16))
  return x.at[0].set(25.0 * jnp.sign(jax.random.normal(jax.random.key(seed + 1), (16,))))


def _mse(x: jax.Array, spec: QuantSpec, method: str) -> jax.Array:
  grid = calibrate_tensor(x, spec, method)
  return jnp.mean(jnp.square(quantize_dequantize(x, spec, grid) - x), axis=0)


@pytest.mark.slow
@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_calibration_beats_minmax_on_heavy_tails(symmetric):
  x = jax.random.t(jax.random.key(5), 3.0, (512, 16))  # Student-t, 3 degrees of freedom.
  spec = QuantSpec(4, True, symmetric)
  mse_error, minmax_error = _mse(x, spec, "mse"), _mse(x, spec, "minmax")
  assert bool(jnp.all(mse_error <= minmax_error))  # Per channel.
  assert float(mse_error.sum()) < 0.85 * float(minmax_error.sum())


@pytest.mark.slow
@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_calibration_clips_outliers(symmetric):
  x = _heavy_tailed().reshape(-1)[:, None]  # One channel of 1024 values, 16 outliers.
  spec = QuantSpec(8, False, symmetric)
  minmax_scale, _ = calibrate_tensor(x, spec, "minmax")
  percentile_scale, _ = calibrate_tensor(x, spec, "percentile", percentile=98.0)
  assert float(percentile_scale.squeeze()) < 0.3 * float(minmax_scale.squeeze())
  restored = quantize_dequantize(x, spec, calibrate_tensor(x, spec, "percentile",
                                                           percentile=98.0))
  assert float(jnp.max(jnp.abs(restored))) < 10.0 < float(jnp.max(jnp.abs(x)))


@pytest.mark.slow
def test_calibrate_weights_covers_kernels_only():
  _, variables, _ = _setup()
  spec = QuantSpec(4, True, True)
  scales = calibrate_weights(variables["params"], spec, "mse")
  assert set(scales) == {f"{layer}/kernel" for layer in SMALL_CNN_LAYERS}
  for path, (scale, zero_point) in scales.items():
    layer, _ = path.split("/")
    kernel = variables["params"][layer]["kernel"]
    assert scale.shape == (1,) * (kernel.ndim - 1) + (kernel.shape[-1],)
    assert float(jnp.abs(zero_point).max()) == 0.0


@pytest.mark.slow
def test_activation_calibration_records_every_conv_and_dense_input():
  model, variables, images = _setup()
  spec = QuantSpec(8, False, False)
  scales = calibrate_activations(model, variables, [images[:3], {"image": images[3:]}], spec)
  assert set(scales) == SMALL_CNN_LAYERS
  for scale, zero_point in scales.values():
    assert scale.size == 1 and float(scale.squeeze()) > 0
  # conv1 sees the normalized pixels (x - 0.5) / 0.25: a range inside [-2, 2] containing 0.
  scale, zero_point = scales["conv1"]
  low = (0 - float(zero_point.squeeze())) * float(scale.squeeze())
  high = (255 - float(zero_point.squeeze())) * float(scale.squeeze())
  normalized = (images - 0.5) / 0.25
  assert abs(low - float(normalized.min())) <= float(scale.squeeze())
  assert abs(high - float(normalized.max())) <= float(scale.squeeze())
  # hidden sees a flattened post-ReLU map: non-negative, so 0 is code 0.
  assert float(scales["hidden"].zero_point.squeeze()) == 0.0
  percentile = calibrate_activations(model, variables, [images], spec, "percentile")
  assert set(percentile) == SMALL_CNN_LAYERS


# --- quantized models ----------------------------------------------------------------------------

@pytest.mark.slow
def test_fold_batch_norm_leaves_outputs_unchanged():
  for name in ("small_cnn", "resnet20"):
    model, variables, images = _setup(name)
    folded = fold_batch_norm(variables)
    np.testing.assert_allclose(model.apply(folded, images), model.apply(variables, images),
                               atol=1e-4, rtol=1e-4)
    bn_scales = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(folded["params"])[0]
                 if jax.tree_util.keystr(path[-1:], simple=True) == "scale"]
    expected = 4 if name == "small_cnn" else 1 + 9 * 2 + 2  # Stem, blocks, two shortcuts.
    assert len(bn_scales) == expected
    assert all(bool(jnp.all(scale == 1.0)) for scale in bn_scales)
    if name == "resnet20":
      assert "shortcut_bn" in folded["params"]["stage2_block0"]
      assert bool(jnp.all(folded["batch_stats"]["stage2_block0"]["shortcut_bn"]["mean"] == 0))


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.mark.slow
@pytest.mark.parametrize("calibrated", [False, True])
def test_quantized_apply_trains_and_gradients_reach_float_params(calibrated):
  model, variables, images = _setup()
  spec = QuantSpec(4, True, True)
  weight_scales = calibrate_weights(variables["params"], spec) if calibrated else None
  activation_spec = QuantSpec(8, False, False) if calibrated else None
  activation_scales = (calibrate_activations(model, variables, [images], activation_spec)
                       if calibrated else None)
  apply = quantized_apply_fn(model, spec, weight_scales, activation_scales, activation_spec)
  labels = jnp.arange(images.shape[0]) % 10

  def loss(params):
    (logits, features), updates = apply(
        {**variables, "params": params}, images, train=True, return_features=True,
        mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return _cross_entropy(logits, labels), (updates, features)

  (value, (updates, features)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"])
  assert np.isfinite(float(value)) and features.shape == (6, 32)
  chex.assert_trees_all_equal_shapes(updates["batch_stats"], variables["batch_stats"])
  for layer in SMALL_CNN_LAYERS:
    assert float(jnp.abs(grads[layer]["kernel"]).sum()) > 0, layer
  eval_logits = apply(variables, images)
  float_logits = model.apply(variables, images)
  assert float(jnp.abs(eval_logits - float_logits).max()) > 1e-4  # Quantization is active.
  if not calibrated:
    quantized = {**variables, "params": fake_quantize_params(variables["params"], None, spec)}
    np.testing.assert_allclose(eval_logits, model.apply(quantized, images), rtol=1e-6)


@pytest.mark.slow
def test_bpda_gradient_is_the_float_models():
  model, variables, images = _setup()
  spec = QuantSpec(2, True, True)
  weight_scales = calibrate_weights(variables["params"], spec)
  activation_spec = QuantSpec(4, False, False)
  activation_scales = calibrate_activations(model, variables, [images], activation_spec)
  direction = jax.random.normal(jax.random.key(9), (images.shape[0], 10))
  ste = quantized_logits_fn(model, spec, weight_scales, activation_scales,
                            activation_spec=activation_spec)
  bpda = quantized_logits_fn(model, spec, weight_scales, activation_scales,
                             straight_through=False, activation_spec=activation_spec)

  def float_fn(variables, x):
    return model.apply(variables, x, train=False)

  def grad(fn):
    return jax.grad(lambda x: jnp.sum(fn(variables, x) * direction))(images)

  chex.assert_trees_all_equal(bpda(variables, images), ste(variables, images))
  np.testing.assert_allclose(grad(bpda), grad(float_fn), rtol=1e-6, atol=1e-7)
  assert float(jnp.abs(grad(ste) - grad(float_fn)).max()) > 1e-4


# --- integer export ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("bits,per_channel,symmetric,dtype", [
    (8, True, True, np.int8), (8, False, False, np.uint8), (6, True, True, np.int8),
    (4, True, True, np.uint8), (4, False, False, np.uint8), (2, True, False, np.uint8),
    (3, True, True, np.uint8),
])
def test_export_round_trip_equals_fake_quantization(bits, per_channel, symmetric, dtype):
  _, variables, _ = _setup()
  params = variables["params"]
  spec = QuantSpec(bits, per_channel, symmetric)
  weight_scales = calibrate_weights(params, spec, "mse")
  exported = export_integer_weights(params, weight_scales, spec)
  kernel = exported["kernels"]["conv2/kernel"]
  assert kernel["values"].dtype == dtype
  weights = 3 * 3 * 8 * 8
  assert kernel["shape"] == (3, 3, 8, 8)
  assert kernel["values"].size == (math.ceil(weights * bits / 8) if bits <= 4 else weights)
  restored = import_integer_weights(exported)
  expected = fake_quantize_params(params, weight_scales, spec)
  chex.assert_trees_all_equal(restored, expected)
  chex.assert_trees_all_equal(restored, jax.jit(fake_quantize_params, static_argnums=2)(
      params, weight_scales, spec))
  stored = sum(np.asarray(array).nbytes for entry in exported["kernels"].values()
               for name, array in entry.items() if name != "shape")
  stored += sum(array.nbytes for array in exported["floats"].values())
  assert stored == model_size_bytes(params, spec)


def test_model_size_bytes_hand_computed():
  params = {"conv": {"kernel": jnp.zeros((3, 3, 2, 4))},
            "dense": {"kernel": jnp.zeros((10, 5)), "bias": jnp.zeros((5,))},
            "bn": {"scale": jnp.ones((4,))}}
  assert model_size_bytes(params) == (72 + 50 + 5 + 4) * 4
  # 4-bit per-channel symmetric: 36 + 4 scales, 25 + 5 scales, 9 floats.
  assert model_size_bytes(params, QuantSpec(4, True, True)) == 36 + 16 + 25 + 20 + 36
  # 2-bit per-tensor asymmetric: ceil(144 / 8) = 18 and ceil(100 / 8) = 13, scale + zero point.
  assert model_size_bytes(params, QuantSpec(2, False, False)) == 18 + 8 + 13 + 8 + 36
  # 8-bit per-tensor symmetric: a byte per weight and one scale per kernel.
  assert model_size_bytes(params, QuantSpec(8, False, True)) == 72 + 4 + 50 + 4 + 36
  shapes = jax.eval_shape(lambda: params)
  assert model_size_bytes(shapes, QuantSpec(4, True, True)) == 133


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), size=st.integers(1, 50), seed=st.integers(0, 2**16))
def test_bit_packing_round_trip(bits, size, seed):
  codes = np.random.default_rng(seed).integers(0, 2**bits, size)
  packed = pack_bits(codes, bits)
  assert packed.dtype == np.uint8 and packed.size == math.ceil(size * bits / 8)
  np.testing.assert_array_equal(unpack_bits(packed, bits, size), codes)


def test_nibble_layout():
  np.testing.assert_array_equal(pack_bits(np.asarray([1, 2, 15]), 4), [0x21, 0x0F])
  np.testing.assert_array_equal(pack_bits(np.asarray([1, 2, 3, 0, 3]), 2), [0b00111001, 0b11])


# --- config --------------------------------------------------------------------------------------

def test_quant_config_specs():
  config = ml_collections.ConfigDict({"weight_bits": 4, "per_channel": False, "symmetric": True,
                                      "activation_bits": 8})
  assert quant_spec_from_config(config) == QuantSpec(4, False, True)
  assert activation_spec_from_config(config) == QuantSpec(8, False, False)
  off = ml_collections.ConfigDict({"weight_bits": 0, "activation_bits": 0})
  assert quant_spec_from_config(off) is None and activation_spec_from_config(off) is None
  assert quant_spec_from_config(ml_collections.ConfigDict()) is None


@pytest.mark.parametrize("fields,key", [
    ({"weight_bits": 1}, "model.quant.weight_bits"),
    ({"weight_bits": 9}, "model.quant.weight_bits"),
    ({"weight_bits": 33}, "model.quant.weight_bits"),
    ({"weight_bits": "eight"}, "model.quant.weight_bits"),
    ({"weight_bits": True}, "model.quant.weight_bits"),
    ({"weight_bits": 8, "activation_bits": 1}, "model.quant.activation_bits"),
    ({"weight_bits": 8, "activation_bits": 17}, "model.quant.activation_bits"),
    ({"weight_bits": 8, "per_channel": "yes"}, "model.quant.per_channel"),
])
def test_bad_quant_config_is_a_one_line_error(fields, key):
  with pytest.raises(ConfigError) as error:
    quant_spec_from_config(ml_collections.ConfigDict(fields))
  assert key in one_line(error)


@pytest.mark.slow
def test_unknown_calibration_method_is_a_one_line_error():
  _, variables, images = _setup()
  spec = QuantSpec(8, True, True)
  with pytest.raises(ConfigError) as error:
    calibrate_weights(variables["params"], spec, "kl")
  assert "model.quant.calibration" in one_line(error) and "'kl'" in one_line(error)
  with pytest.raises(ConfigError) as error:
    calibrate_activations(_setup()[0], variables, [images], spec, "entropy")
  assert "model.quant.calibration" in one_line(error)

"""The fast input-gradient convolution equals autodiff of the plain model (float tolerance)."""
from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import lax

from adcorda_jax.models import create_model
from adcorda_jax.models.fast_conv import conv2d, input_gradient
from adcorda_jax.models.frozen import frozen_logits_fn, use_fast_input_gradients

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _plain_conv(x, kernel, strides, padding):
  """The reference: explicit zero padding, then a VALID convolution.

  Its autodiff never needs negative padding, which XLA:CPU (jaxlib 0.10.2) can get wrong with
  several input channels (see fast_conv._conv and tests/test_native_conv.py).
  """
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  return lax.conv_general_dilated(x, kernel, strides, "VALID",
                                  dimension_numbers=DIMENSION_NUMBERS)


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(size=st.integers(3, 9), channels=st.integers(1, 7), out_channels=st.integers(1, 5),
       kernel=st.integers(1, 5), stride=st.integers(1, 3), pad_low=st.integers(0, 2),
       pad_high=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_input_gradient_equals_autodiff(size, channels, out_channels, kernel, stride, pad_low,
                                        pad_high, seed):
  assume(size + pad_low + pad_high >= kernel)  # Else the kernel does not fit the padded input.
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (2, size, size + 1, channels))
  w = jax.random.normal(keys[1], (kernel, kernel, channels, out_channels))
  strides, padding = (stride, stride), ((pad_low, pad_high), (pad_low, pad_high))
  y, vjp = jax.vjp(lambda v: _plain_conv(v, w, strides, padding), x)
  dy = jax.random.normal(keys[2], y.shape)
  expected = vjp(dy)[0]
  got = input_gradient(dy, w, x.shape, strides, padding)
  chex.assert_shape(got, x.shape)
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_conv2d_values_and_both_gradients_equal_plain_conv():
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (3, 9, 9, 6))
  w = jax.random.normal(keys[1], (3, 3, 6, 8))
  args = ((2, 2), ((1, 1), (1, 1)))

  def loss(conv, v, k):
    return jnp.sum(jnp.tanh(conv(v, k, *args)) * keys_weight)

  keys_weight = jax.random.normal(keys[2], (3, 5, 5, 8))
  np.testing.assert_array_equal(conv2d(x, w, *args), _plain_conv(x, w, *args))
  fast = jax.grad(lambda v, k: loss(conv2d, v, k), argnums=(0, 1))(x, w)
  plain = jax.grad(lambda v, k: loss(_plain_conv, v, k), argnums=(0, 1))(x, w)
  chex.assert_trees_all_close(fast, plain, atol=1e-4, rtol=1e-4)


def _model(name, num_classes):
  return create_model(ml_collections.ConfigDict({"name": name, "width": 1.0, "dropout": 0.0}),
                      num_classes, (0.4,), (0.3,))


@pytest.mark.slow
@pytest.mark.parametrize("name,shape,num_classes", [
    ("small_cnn", (4, 28, 28, 1), 10), ("small_cnn", (4, 8, 8, 1), 10),
    ("resnet20", (4, 32, 32, 3), 100)])
def test_frozen_model_input_gradient_equals_jax_grad(name, shape, num_classes):
  model = _model(name, num_classes)
  x = jax.random.uniform(jax.random.key(1), shape)
  variables = model.init(jax.random.key(0), x)
  # Non-trivial running statistics, so eval-mode BatchNorm is not the identity.
  variables = {"params": variables["params"],
               "batch_stats": jax.tree.map(lambda s: s + 0.3 * jax.random.uniform(
                   jax.random.key(2), s.shape), variables["batch_stats"])}
  labels = jnp.arange(shape[0]) % num_classes

  def grad_of(logits_fn):
    def loss(v):
      logits = logits_fn(variables, v)
      return jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(shape[0]), labels])
    return jax.jit(jax.value_and_grad(loss))(x)

  fast = grad_of(frozen_logits_fn(model, True))
  reference = jax.value_and_grad(lambda v: jnp.sum(jax.nn.log_softmax(
      model.apply(variables, v, train=False))[jnp.arange(shape[0]), labels]))(x)
  chex.assert_trees_all_close(fast, reference, atol=2e-5, rtol=1e-4)
  assert float(jnp.max(jnp.abs(reference[1]))) > 0


@pytest.mark.slow
def test_unsupported_convolutions_fall_back_to_flax():
  class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(4, (3, 3), feature_group_count=2, padding="SAME")(x)
      x = nn.Conv(4, (3, 3), kernel_dilation=2, padding="CIRCULAR")(x)
      return nn.Conv(3, (2, 2), strides=2, padding="VALID", use_bias=True)(x).mean((1, 2))

  model = Grouped()
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 2))
  variables = model.init(jax.random.key(1), x)
  fast = jax.grad(lambda v: frozen_logits_fn(model, True)(variables, v).sum())(x)
  plain = jax.grad(lambda v: model.apply(variables, v).sum())(x)
  np.testing.assert_allclose(fast, plain, atol=1e-5)


def test_auto_setting_enables_the_fast_path_only_on_cpu():
  assert use_fast_input_gradients("auto", "cpu")
  assert not use_fast_input_gradients("auto", "gpu")
  assert not use_fast_input_gradients("auto", "tpu")
  assert use_fast_input_gradients(True, "gpu") and not use_fast_input_gradients(False, "cpu")

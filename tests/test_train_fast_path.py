"""The training path: native kernel gradients and the fast convolutions every training step uses.

Gradients (weights and inputs) equal autodiff of the plain convolution to float tolerance, over
shapes, strides, paddings and channel counts and on whole models in train mode (against a
float64 reference); every training and evaluation step lowers to the native kernels on the CPU;
training on digits with them matches the plain path.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax import lax

from adcorda_jax.data import load_dataset
from adcorda_jax.models import create_model, fast_conv
from adcorda_jax.models.fast_path import fast_convolutions
from adcorda_jax.native import build
from adcorda_jax.native import conv2d as native_conv
from adcorda_jax.training import finetune, steps

REPO = Path(__file__).resolve().parents[1]
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
needs_native = pytest.mark.skipif(not native_conv.available(),
                                  reason="no C++ compiler: the native kernel is not built")


def _reference_conv(x, kernel, strides, padding):
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  return lax.conv_general_dilated(x, kernel, strides, "VALID", dimension_numbers=DIMENSION_NUMBERS,
                                  precision=lax.Precision.HIGHEST)


_shapes = dict(batch=st.integers(1, 4), height=st.integers(1, 12), width=st.integers(1, 12),
               channels=st.integers(1, 40), out_channels=st.integers(1, 40),
               kh=st.integers(1, 5), kw=st.integers(1, 5),
               strides=st.tuples(st.integers(1, 3), st.integers(1, 3)),
               pads=st.tuples(*[st.integers(0, 3)] * 4), seed=st.integers(0, 2**16))


def _case(batch, height, width, channels, out_channels, kh, kw, pads, seed):
  padding = ((pads[0], pads[1]), (pads[2], pads[3]))
  assume(height + pads[0] + pads[1] >= kh and width + pads[2] + pads[3] >= kw)
  keys = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(keys[0], (batch, height, width, channels))
  kernel = jax.random.normal(keys[1], (kh, kw, channels, out_channels))
  return x, kernel, padding


def _check_kernel_gradient(x, kernel, strides, padding, seed):
  y, vjp = jax.vjp(lambda k: _reference_conv(x, k, strides, padding), kernel)
  dy = jax.random.normal(jax.random.key(seed + 1), y.shape)
  got = jax.jit(native_conv.kernel_gradient, static_argnums=(2, 3, 4))(
      x, dy, kernel.shape[:2], strides, padding)
  want = vjp(dy)[0]
  assert got.shape == want.shape
  scale = float(jnp.max(jnp.abs(want))) + 1e-6
  np.testing.assert_allclose(got / scale, want / scale, atol=2e-6)


@pytest.mark.slow
@needs_native
@settings(max_examples=25, deadline=None)
@given(**_shapes)
def test_native_kernel_gradient_equals_autodiff(batch, height, width, channels, out_channels,
                                                kh, kw, strides, pads, seed):
  x, kernel, padding = _case(batch, height, width, channels, out_channels, kh, kw, pads, seed)
  _check_kernel_gradient(x, kernel, strides, padding, seed)


@needs_native
@pytest.mark.parametrize("shape,kernel_shape,strides,padding", [
    ((2, 28, 28, 1), (3, 3, 1, 32), (1, 1), ((1, 1), (1, 1))),    # small_cnn conv1
    ((2, 14, 14, 32), (3, 3, 32, 64), (1, 1), ((1, 1), (1, 1))),  # small_cnn conv3
    ((2, 32, 32, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),  # ResNet-20 downsampling
    ((2, 16, 16, 32), (1, 1, 32, 64), (2, 2), ((0, 0), (0, 0))),  # projection shortcut
    ((3, 9, 7, 5), (5, 3, 5, 20), (2, 1), ((2, 1), (0, 3))),      # odd everything
])
def test_native_kernel_gradient_of_model_layers(shape, kernel_shape, strides, padding):
  keys = jax.random.split(jax.random.key(0), 2)
  _check_kernel_gradient(jax.random.normal(keys[0], shape),
                         jax.random.normal(keys[1], kernel_shape), strides, padding, 1)


@pytest.mark.slow
@settings(max_examples=20, deadline=None)
@given(**_shapes)
def test_fast_conv_gradients_equal_autodiff_for_inputs_and_kernels(
    batch, height, width, channels, out_channels, kh, kw, strides, pads, seed):
  x, kernel, padding = _case(batch, height, width, channels, out_channels, kh, kw, pads, seed)
  weights = jax.random.normal(jax.random.key(seed + 1),
                              _reference_conv(x, kernel, strides, padding).shape)
  loss = lambda conv: lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) * weights)
  fast = jax.jit(jax.grad(loss(lambda x, k: fast_conv.conv2d(x, k, strides, padding)),
                          argnums=(0, 1)))(x, kernel)
  want = jax.jit(jax.grad(loss(lambda x, k: _reference_conv(x, k, strides, padding)),
                          argnums=(0, 1)))(x, kernel)
  # tanh and its derivative amplify the sums' rounding: hypothesis found 1.1e-5 of the max for
  # 400-term sums (40 channels x 2x5 taps; the previous release's kernel gives the same).
  for got, expected in zip(fast, want):
    scale = float(jnp.max(jnp.abs(expected))) + 1e-6
    np.testing.assert_allclose(got / scale, expected / scale, atol=2e-5)


def _model(name):
  return create_model(ml_collections.ConfigDict({"name": name}), 10, (0.5,), (0.25,))


def _train_loss(model, batch_stats, labels):
  def loss(params, x):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                            mutable=["batch_stats"])
    return steps.cross_entropy(logits, labels, 10).mean()
  return loss


def _relative_errors(got, want):
  """Per-leaf relative L2 error of `got` against `want` (both as float64)."""
  to64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
  errors = jax.tree.map(lambda a, b: float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30)),
                        to64(got), to64(want))
  return {jax.tree_util.keystr(path): error
          for path, error in jax.tree_util.tree_flatten_with_path(errors)[0]}


def _train_mode_gradients(name, shape, fast):
  model = _model(name)
  state = steps.create_train_state(jax.random.key(0), model, shape, optax.sgd(0.1))
  x = jax.random.uniform(jax.random.key(1), (16,) + shape)
  loss = _train_loss(model, state.batch_stats, jnp.arange(16) % 10)

  def gradients(params, x):
    with fast_convolutions(fast):
      return jax.grad(loss, argnums=(0, 1))(params, x)

  return jax.jit(gradients)(state.params, x), (loss, state.params, x)


@pytest.fixture
def smooth_relu(monkeypatch):
  """The models' ReLUs as GELU while a whole-model gradient is compared.

  With ReLU the comparison is luck: a pre-activation within float32 rounding of zero takes the
  other side of the kink in one of the two programs, and its whole gradient jumps. Measured on
  ResNet-20 over 5 input seeds, the worst leaf against float64 ranged 2.7e-6 to 1.1e-2 for the
  native path and 2.6e-6 to 1.1e-2 for XLA's own float32 program (both hit on the same seed);
  with GELU both stay at 5e-6 to 9e-6 on every seed. The convolutions under test are the same.
  """
  monkeypatch.setattr(nn, "relu", jax.nn.gelu)


def test_small_cnn_train_mode_gradients_equal_the_plain_model(smooth_relu):
  fast, _ = _train_mode_gradients("small_cnn", (28, 28, 1), True)
  plain, _ = _train_mode_gradients("small_cnn", (28, 28, 1), False)
  errors = _relative_errors(fast, plain)  # Every weight leaf and the input gradient.
  worst = max(errors, key=errors.get)
  assert errors[worst] < 1e-4, f"{worst}: relative error {errors[worst]:.2e}"


@pytest.mark.slow
def test_resnet20_train_mode_gradients_equal_a_float64_reference(smooth_relu):
  # Against float64, every leaf within 1e-4 (measured 5e-6 to 9e-6 over 5 input seeds, the
  # same as XLA's own float32 program); a wrong tap, phase or padding is off by O(1).
  fast, (loss, params, x) = _train_mode_gradients("resnet20", (32, 32, 3), True)
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    reference = jax.jit(jax.grad(loss, argnums=(0, 1)))(to64(params), to64(x))
    errors = _relative_errors(fast, reference)
  worst = max(errors, key=errors.get)
  assert errors[worst] < 1e-4, f"{worst}: relative error {errors[worst]:.2e}"


def _native_calls(text):
  return text.count(build.TARGET), text.count(build.KERNEL_GRAD_TARGET)


@needs_native
def test_every_train_and_eval_step_lowers_to_the_native_kernels_on_cpu():
  model = _model("small_cnn")
  state = steps.create_train_state(jax.random.key(0), model, (8, 8, 1), optax.sgd(0.1))
  batch = {"image": jnp.zeros((4, 8, 8, 1)), "label": jnp.zeros((4,), jnp.int32),
           "mask": jnp.ones((4,))}
  key = jax.random.key(0)
  lower = lambda fn, *args: jax.jit(fn).lower(*args).as_text()
  default = lower(functools.partial(steps.train_step, num_classes=10), state, batch, key)
  forward, kernel_grads = _native_calls(default)
  # 4 convs: forward each, kernel gradient each, input gradient for the 3 after the first.
  assert (forward, kernel_grads) == (4 + 3, 4)
  plain = lower(functools.partial(steps.train_step, num_classes=10, fast_convolutions=False),
                state, batch, key)
  assert _native_calls(plain) == (0, 0)
  evaluation = lower(functools.partial(steps.eval_step, model.apply, num_classes=10),
                     {"params": state.params, "batch_stats": state.batch_stats}, batch)
  assert _native_calls(evaluation) == (4, 0)
  tuned = lower(functools.partial(finetune.finetune_step, num_classes=10, alignment=None,
                                  lambda_=0.0, train_batch_norm=True), state, batch, None, key)
  assert _native_calls(tuned) == (7, 4)


@needs_native
def test_kernel_gradient_is_deterministic():
  x = jax.random.normal(jax.random.key(0), (64, 16, 16, 16))
  dy = jax.random.normal(jax.random.key(1), (64, 16, 16, 32))
  gradient = jax.jit(lambda x, dy: native_conv.kernel_gradient(x, dy, (3, 3), (1, 1),
                                                               ((1, 1), (1, 1))))
  first = np.asarray(gradient(x, dy))
  for _ in range(3):
    np.testing.assert_array_equal(np.asarray(gradient(x, dy)), first)


@pytest.mark.slow
@needs_native
def test_one_epoch_on_digits_matches_the_plain_path():
  config = ml_collections.ConfigDict({"name": "digits", "val_fraction": 0.1,
                                      "test_fraction": 0.2})
  dataset = load_dataset(config, seed=0)
  model = create_model(ml_collections.ConfigDict({"name": "small_cnn"}), dataset.num_classes,
                       dataset.mean, dataset.std)
  images, labels = dataset.train.images, dataset.train.labels
  batch_size, results = 64, {}
  for fast in (False, True):
    # A small step keeps the two runs' float32 rounding differences from compounding (with
    # lr 0.05 and Nesterov momentum the runs drift 5 test images apart within the epoch).
    state = steps.create_train_state(jax.random.key(0), model, images.shape[1:],
                                     optax.sgd(0.01, momentum=0.9))
    step = jax.jit(functools.partial(steps.train_step, num_classes=dataset.num_classes,
                                     fast_convolutions=fast))
    order = np.random.default_rng(0).permutation(len(images))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      index = order[start:start + batch_size]
      state, _ = step(state, {"image": jnp.asarray(images[index]),
                              "label": jnp.asarray(labels[index])}, jax.random.key(1))
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                         jnp.asarray(dataset.test.images))
    results[fast] = (np.asarray(jnp.argmax(logits, -1)), state.params)
  plain_predictions, plain_params = results[False]
  fast_predictions, fast_params = results[True]
  accuracy = lambda p: float(np.mean(p == dataset.test.labels))
  assert accuracy(plain_predictions) > 0.8  # The epoch trained something.
  assert abs(accuracy(fast_predictions) - accuracy(plain_predictions)) <= 2 / len(plain_predictions)
  drift = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain_params, fast_params)
  assert max(jax.tree.leaves(drift)) < 1e-3


_FOUR_DEVICES = r"""
import sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from adcorda_jax.native import conv2d as native_conv
assert jax.device_count() == 4 and native_conv.available()
x = jax.random.normal(jax.random.key(0), (8, 10, 10, 16))
dy = jax.random.normal(jax.random.key(1), (8, 10, 10, 32))
mesh = Mesh(np.asarray(jax.devices()), ("data",))
shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
f = jax.jit(lambda x, dy: native_conv.kernel_gradient(x, dy, (3, 3), (1, 1), ((1, 1), (1, 1))))
hlo = f.lower(shard(x), shard(dy)).compile().as_text()
assert "all-gather" not in hlo and "all-reduce" in hlo, "inputs were gathered, not reduced"
np.save(sys.argv[1], np.asarray(f(shard(x), shard(dy))))
"""


@pytest.mark.slow
@pytest.mark.subprocess
@needs_native
def test_sharded_kernel_gradient_sums_the_devices_shares(tmp_path):
  x = jax.random.normal(jax.random.key(0), (8, 10, 10, 16))
  dy = jax.random.normal(jax.random.key(1), (8, 10, 10, 32))
  single = native_conv.kernel_gradient(x, dy, (3, 3), (1, 1), ((1, 1), (1, 1)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, str(tmp_path / "dw.npy")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "dw.npy"), single, rtol=1e-5, atol=1e-4)


@needs_native
def test_qat_gradients_through_fake_quantized_kernels_equal_the_plain_path(smooth_relu):
  from adcorda_jax.quant.quantized_model import quantized_apply_fn
  from adcorda_jax.quant.fake_quant import QuantSpec
  model = _model("small_cnn")
  state = steps.create_train_state(jax.random.key(0), model, (8, 8, 1), optax.sgd(0.1))
  apply = quantized_apply_fn(model, QuantSpec(4, True, True))
  x = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))

  def gradients(params, fast):
    def loss(params):
      logits, _ = apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                        mutable=["batch_stats"])
      return steps.cross_entropy(logits, jnp.arange(8) % 10, 10).mean()
    with fast_convolutions(fast):
      return jax.grad(loss)(params)

  fast = jax.jit(functools.partial(gradients, fast=True))
  assert _native_calls(fast.lower(state.params).as_text())[1] == 4  # Quantized kernels feed it.
  errors = _relative_errors(fast(state.params), jax.jit(functools.partial(
      gradients, fast=False))(state.params))
  worst = max(errors, key=errors.get)
  assert errors[worst] < 1e-4, f"{worst}: relative error {errors[worst]:.2e}"

"""The frozen-network rewrite: folded conv -> BatchNorm -> ReLU [-> add -> ReLU] on fused kernels.

What must hold: the native fused convolution equals its XLA definition for every operand set,
shape, stride and padding; the fused layer's gradients (input, kernel, bias, residual) equal
autodiff; and a whole model rewritten by `fused_logits_fn` gives the plain eval-mode model's
logits and input gradients, while layers outside the patterns are left alone.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adcorda_jax.attacks import attack_model, pgd
from adcorda_jax.models import create_model, fast_conv
from adcorda_jax.models.frozen import frozen_logits_fn
from adcorda_jax.models import fused_frozen
from adcorda_jax.models.fused_frozen import fused_logits_fn, fusion_plan
from adcorda_jax.native import build
from adcorda_jax.native import conv2d as native_conv

REPO = Path(__file__).resolve().parents[1]
needs_native = pytest.mark.skipif(not native_conv.available(),
                                  reason="no C++ compiler: the native kernel is not built")


def _operands(key, x_shape, kernel_shape, strides, padding):
  keys = jax.random.split(key, 5)
  x = jax.random.normal(keys[0], x_shape)
  kernel = jax.random.normal(keys[1], kernel_shape) * 0.3
  out_shape = native_conv.output_shape(x_shape, kernel_shape, strides, padding)
  bias = jax.random.normal(keys[2], (kernel_shape[-1],))
  residual = jax.random.normal(keys[3], out_shape)
  gate = jax.random.normal(keys[4], x_shape)
  return x, kernel, bias, residual, gate


@pytest.mark.slow
@needs_native
@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), size=st.integers(2, 30), channels=st.integers(1, 20),
       out_channels=st.integers(1, 40), kernel_size=st.sampled_from([1, 2, 3]),
       stride=st.integers(1, 2), pad=st.integers(0, 2),
       use=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()))
def test_native_fused_conv_equals_its_xla_definition(batch, size, channels, out_channels,
                                                     kernel_size, stride, pad, use):
  size = max(size, kernel_size)
  strides, padding = (stride, stride), ((pad, pad), (pad, 0))
  x, kernel, bias, residual, gate = _operands(
      jax.random.key(size), (batch, size, size + 1, channels),
      (kernel_size, kernel_size, channels, out_channels), strides, padding)
  with_bias, with_residual, with_gate, relu = use
  operands = dict(bias=bias if with_bias else None, residual=residual if with_residual else None,
                  gate=gate if with_gate else None, relu=relu)
  got = jax.jit(lambda *a: native_conv.conv2d_fused(*a, strides, padding, **operands))(x, kernel)
  want = native_conv.reference_conv_fused(x, kernel, strides, padding, **operands)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@needs_native
def test_fused_conv_folds_vmapped_inputs_and_partitions_nothing_else():
  x, kernel, bias, residual, gate = _operands(jax.random.key(0), (2, 3, 9, 9, 5), (3, 3, 5, 16),
                                              (1, 1), ((1, 1), (1, 1)))
  residual = jax.random.normal(jax.random.key(1), (2, 3, 9, 9, 16))
  fused = lambda xi, ri: native_conv.conv2d_fused(xi, kernel, (1, 1), ((1, 1), (1, 1)),
                                                  bias=bias, residual=ri, relu=True)
  want = jax.vmap(lambda xi, ri: native_conv.reference_conv_fused(
      xi, kernel, (1, 1), ((1, 1), (1, 1)), bias=bias, residual=ri, relu=True))(x, residual)
  np.testing.assert_allclose(jax.jit(jax.vmap(fused))(x, residual), want, atol=2e-5)
  # One native call for the folded batch, not one per vmapped element.
  text = jax.jit(jax.vmap(fused)).lower(x, residual).as_text()
  assert text.count(build.FUSED_TARGET) == 1
  # A per-element kernel is XLA's (the kernel takes one kernel per call).
  kernels = jnp.stack([kernel, 2 * kernel])
  per_kernel = jax.vmap(lambda xi, ki: native_conv.conv2d_fused(
      xi, ki, (1, 1), ((1, 1), (1, 1)), bias=bias, relu=True))(x, kernels)
  np.testing.assert_allclose(per_kernel, jax.vmap(lambda xi, ki: native_conv.reference_conv_fused(
      xi, ki, (1, 1), ((1, 1), (1, 1)), bias=bias, relu=True))(x, kernels), atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("strides,padding,residual,relu", [
    ((1, 1), ((1, 1), (1, 1)), True, True), ((2, 2), ((1, 1), (1, 1)), False, True),
    ((1, 1), ((0, 0), (0, 0)), False, False), ((2, 2), ((0, 0), (0, 0)), True, False)])
def test_fused_layer_gradients_equal_autodiff(native, strides, padding, residual, relu):
  if native and not native_conv.available():
    pytest.skip("no C++ compiler: the native kernel is not built")
  kernel_hw = (1, 1) if padding == ((0, 0), (0, 0)) else (3, 3)
  x, kernel, bias, res, _ = _operands(jax.random.key(3), (3, 12, 12, 16),
                                      kernel_hw + (16, 32), strides, padding)
  res = res if residual else None
  cotangent = jax.random.normal(jax.random.key(4), native_conv.output_shape(
      x.shape, kernel.shape, strides, padding))

  def loss(fn):
    return lambda x, k, b, r: jnp.sum(cotangent * fn(x, k, b, r))
  fused = loss(lambda x, k, b, r: fast_conv.conv2d_bias_act(x, k, b, r, strides, padding, relu,
                                                            native))
  plain = loss(lambda x, k, b, r: native_conv.reference_conv_fused(
      x, k, strides, padding, bias=b, residual=r, relu=relu))
  argnums = (0, 1, 2, 3) if residual else (0, 1, 2)
  got = jax.jit(jax.grad(fused, argnums))(x, kernel, bias, res)
  want = jax.grad(plain, argnums)(x, kernel, bias, res)
  for name, g, w in zip(("x", "kernel", "bias", "residual"), got, want):
    scale = float(jnp.abs(w).max()) or 1.0
    np.testing.assert_allclose(g, w, atol=2e-5 * scale, rtol=1e-4, err_msg=name)


def _model_with_statistics(name: str, shape, num_classes: int = 10):
  """A model whose BatchNorm statistics and affine parameters are far from the identity."""
  model = create_model({"name": name}, num_classes, (0.5,), (0.25,))
  x = jax.random.uniform(jax.random.key(0), (4,) + shape)

  @jax.jit
  def variables_with_statistics(x):
    variables = model.init(jax.random.key(1), x)
    leaves, treedef = jax.tree.flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    changed = []
    for (path, leaf), key in zip(leaves, keys):
      noise = 0.3 * jax.random.normal(key, leaf.shape)
      changed.append(jnp.abs(leaf + noise) + 0.5 if "var" in jax.tree_util.keystr(path)
                     else leaf + noise)
    return jax.tree.unflatten(treedef, changed)

  return model, variables_with_statistics(x), x


@pytest.mark.parametrize("name,shape,convs,residuals", [
    ("small_cnn", (28, 28, 1), 4, 0), ("resnet20", (32, 32, 3), 21, 9)])
def test_every_conv_batchnorm_relu_chain_is_found(name, shape, convs, residuals):
  model = create_model({"name": name}, 10, (0.5,), (0.25,))
  x = jnp.zeros((2,) + shape)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  plan = fusion_plan(model, variables, x)
  assert len(plan) == convs and sum(r["residual"] for r in plan) == residuals
  assert all(r["affine_ops"] == 3 for r in plan)  # BatchNorm: sub mean, mul scale, add bias.
  # Every conv + BN is followed by a ReLU except the projection shortcuts (added, not clamped).
  assert sum(not r["relu"] for r in plan) == (0 if name == "small_cnn" else 2)


@pytest.mark.slow
@pytest.mark.parametrize("name,shape", [("small_cnn", (28, 28, 1)), ("resnet20", (32, 32, 3))])
def test_rewritten_model_equals_plain_eval_model(name, shape):
  model, variables, x = _model_with_statistics(name, shape)
  plain = lambda v, images: model.apply(v, images, train=False)
  fused = fused_logits_fn(model)
  logits = jax.jit(fused)(variables, x)
  want = jax.jit(plain)(variables, x)
  chex.assert_trees_all_close(logits, want, atol=1e-4 * float(jnp.abs(want).max()))

  def input_gradient(fn):
    return jax.grad(lambda images: jax.nn.log_softmax(fn(variables, images))[:, 1].sum())
  got = jax.jit(input_gradient(fused))(x)
  expected = jax.jit(input_gradient(plain))(x)
  scale = float(jnp.abs(expected).max())
  np.testing.assert_allclose(got, expected, atol=1e-4 * scale)
  # Parameter gradients flow through the folded kernels and biases too.
  grads = jax.jit(jax.grad(lambda v: fused(v, x).sum()))(variables)
  want_grads = jax.jit(jax.grad(lambda v: plain(v, x).sum()))(variables)
  for (path, g), w in zip(jax.tree.flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=2e-4 * (float(jnp.abs(w).max()) or 1.0),
                               err_msg=jax.tree_util.keystr(path))


class _Unfusable(nn.Module):
  """Convs the rewrite must leave alone: one whose output is used twice, a dilated one, and a
  BatchNorm in train mode (batch statistics depend on the input)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.Conv(8, (3, 3), padding=1, name="shared")(x)
    z = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(y)) + y  # y used twice
    z = nn.Conv(8, (3, 3), padding=2, kernel_dilation=2, name="dilated")(z)
    z = nn.BatchNorm(use_running_average=not train, name="bn_train")(z)
    return nn.relu(nn.Conv(4, (3, 3), padding=1, use_bias=False, name="last")(z)).mean((1, 2))


@pytest.mark.slow
def test_layers_outside_the_patterns_keep_their_own_operations():
  model = _Unfusable()
  x = jax.random.uniform(jax.random.key(0), (2, 9, 9, 3))
  variables = model.init(jax.random.key(1), x)
  plan = {r["kernel"]: r for r in fusion_plan(model, variables, x)}
  # "shared" takes only its own bias (its output then has two users), the dilated conv (and so
  # the BatchNorm after it) is not in the plan, "last" fuses its ReLU.
  assert set(plan) == {(3, 3, 3, 8), (3, 3, 8, 4)}
  assert plan[(3, 3, 3, 8)]["affine_ops"] == 1 and not plan[(3, 3, 3, 8)]["relu"]
  assert plan[(3, 3, 8, 4)]["affine_ops"] == 0 and plan[(3, 3, 8, 4)]["relu"]
  np.testing.assert_allclose(fused_logits_fn(model)(variables, x),
                             model.apply(variables, x, train=False), atol=1e-5)


@pytest.mark.slow
def test_train_mode_batchnorm_is_never_folded():
  # Batch statistics depend on the image input, so they are not per-channel constants.
  model, variables, x = _model_with_statistics("small_cnn", (28, 28, 1))
  closed = jax.make_jaxpr(lambda v, images: model.apply(
      v, images, train=True, mutable=["batch_stats"])[0])(variables, x)
  chains = fused_frozen._match_chains(closed.jaxpr, closed.jaxpr.invars[-1:])
  assert len(chains) == 4 and all(not chain.affine for chain in chains.values())


@pytest.mark.slow
def test_library_attack_path_uses_the_fused_network():
  model, variables, x = _model_with_statistics("small_cnn", (28, 28, 1))
  logits_fn, params = attack_model(model, variables, fast_input_gradients=True)
  assert logits_fn is fused_logits_fn(model, True)
  assert frozen_logits_fn(model, True, True, False) is not logits_fn  # unfused stays available
  labels = jnp.argmax(model.apply(variables, x, train=False), -1)
  settings_ = dict(key=jax.random.key(5), eps=8 / 255, step_size=2 / 255, steps=5,
                   early_stop=False)
  fused = pgd(logits_fn, params, x, labels, **settings_)
  plain = pgd(frozen_logits_fn(model, False), variables, x, labels, **settings_)
  # Same steps: a sign flip of a near-zero gradient moves a pixel by one step at most.
  difference = np.abs(np.asarray(fused.adversarial) - np.asarray(plain.adversarial))
  assert np.mean(difference > 1e-5) < 0.01 and difference.max() <= 2 * 2 / 255 + 1e-6
  assert np.max(np.abs(np.asarray(fused.adversarial) - np.asarray(x))) <= 8 / 255 + 1e-6


_FOUR_DEVICES = r"""
import sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from adcorda_jax.native import conv2d as native_conv
assert jax.device_count() == 4 and native_conv.available()
keys = jax.random.split(jax.random.key(0), 4)
x = jax.random.normal(keys[0], (8, 10, 10, 16)); k = jax.random.normal(keys[1], (3, 3, 16, 32))
b = jax.random.normal(keys[2], (32,)); r = jax.random.normal(keys[3], (8, 10, 10, 32))
mesh = Mesh(np.asarray(jax.devices()), ("data",))
batch, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
f = jax.jit(lambda x, k, b, r: native_conv.conv2d_fused(
    x, k, (1, 1), ((1, 1), (1, 1)), bias=b, residual=r, gate=x, relu=True))
args = (jax.device_put(x, batch), jax.device_put(k, whole), jax.device_put(b, whole),
        jax.device_put(r, batch))
hlo = f.lower(*args).compile().as_text()
assert "all-gather" not in hlo and "all-reduce" not in hlo, "inputs were gathered"
y = f(*args)
assert y.sharding.spec[0] == "data", y.sharding
np.save(sys.argv[1], np.asarray(y))
np.save(sys.argv[2], np.asarray(native_conv.reference_conv_fused(
    x, k, (1, 1), ((1, 1), (1, 1)), bias=b, residual=r, gate=x, relu=True)))
"""


@pytest.mark.slow
@pytest.mark.subprocess
@needs_native
def test_fused_conv_is_partitioned_per_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, str(tmp_path / "y.npy"),
                        str(tmp_path / "want.npy")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.load(tmp_path / "want.npy"),
                             atol=2e-5)

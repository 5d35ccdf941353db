"""`train.compute_dtype`: bfloat16 compute with float32 parameters, optimizer state and loss."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from adcorda_jax.errors import ConfigError
from adcorda_jax.models import create_model
from adcorda_jax.pipeline import fingerprint
from adcorda_jax.training import steps, trainer


def _setup(name="resnet20"):
  model = create_model({"name": name, "width": 0.5}, 10, mean=(0.5,), std=(0.25,))
  config = ml_collections.ConfigDict({"compute_dtype": "bfloat16"})
  bf16 = trainer.with_compute_dtype(model, config)
  batch = {"image": jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 3)), jnp.float32),
           "label": jnp.arange(4, dtype=jnp.int32)}
  return model, bf16, batch


def _dtypes(tree):
  return {leaf.dtype for leaf in jax.tree.leaves(tree)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small_cnn", "resnet20"])
def test_bfloat16_step_keeps_float32_state(name):
  model, bf16, batch = _setup(name)
  assert bf16.dtype == jnp.bfloat16 and model.dtype is None  # None: float32 from the inputs.
  tx = optax.sgd(0.1, momentum=0.9)
  state = steps.create_train_state(jax.random.key(0), bf16, (8, 8, 3), tx)
  step = jax.jit(functools.partial(steps.train_step, num_classes=10))
  hlo = step.lower(state, batch, jax.random.key(1)).as_text()
  assert "stablehlo.convolution" in hlo and "xbf16>" in hlo  # Convolutions compute in bf16.
  new_state, metrics = step(state, batch, jax.random.key(1))
  assert _dtypes(new_state.params) == {jnp.dtype(jnp.float32)}
  assert _dtypes(new_state.opt_state) == {jnp.dtype(jnp.float32)}
  assert _dtypes(new_state.batch_stats) == {jnp.dtype(jnp.float32)}
  assert _dtypes(metrics) == {jnp.dtype(jnp.float32)}
  assert metrics["params_finite"] == 1.0
  # The trained variables are the float32 model's: it evaluates them in float32, and the bf16
  # forward agrees with it to bf16 rounding.
  variables = {"params": new_state.params, "batch_stats": new_state.batch_stats}
  logits32 = model.apply(variables, batch["image"])
  logits16 = bf16.apply(variables, batch["image"])
  assert logits32.dtype == logits16.dtype == jnp.float32
  scale = float(jnp.abs(logits32).max())
  assert 0 < float(jnp.abs(logits32 - logits16).max()) <= 0.1 * scale + 0.05


def test_float32_default_is_the_model_itself():
  model, _, _ = _setup()
  assert trainer.with_compute_dtype(model, ml_collections.ConfigDict()) is model


def test_bad_compute_dtype_names_the_key():
  model, _, _ = _setup()
  with pytest.raises(ConfigError, match="train.compute_dtype='float16'"):
    trainer.with_compute_dtype(model, ml_collections.ConfigDict({"compute_dtype": "float16"}))


def test_runs_saved_before_the_key_still_match():
  old = {"train": {"epochs": 2}}
  assert fingerprint.differences(old, {"train": {"epochs": 2, "compute_dtype": "float32"}}) == []
  assert fingerprint.differences(old, {"train": {"epochs": 2, "compute_dtype": "bfloat16"}}) == [
      "train.compute_dtype"]

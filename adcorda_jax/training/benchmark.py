"""Measuring train-step throughput: img/s, compile time, XLA's FLOP count, fraction of peak.

The same `steps.train_step` a user's loop jits (random data, SGD with Nesterov momentum,
BatchNorm in train mode, no augmentation), compiled once per implementation and timed
interleaved with the others after a warm-up, so machine noise hits every variant alike. FLOPs
per image come from XLA's cost analysis of the plain program: custom calls (the native
kernels) report none, so the plain program's count is the useful work of every variant.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adcorda_jax.training import steps

# Implementation name -> (`train_step(fast_convolutions=...)`, the model's compute dtype).
IMPLEMENTATIONS = {
    "plain": (False, jnp.float32),    # flax's convolutions differentiated by autodiff on XLA.
    "adcorda": ("auto", jnp.float32),  # The library's default: native CPU convolutions.
    # train.compute_dtype=bfloat16: mixed precision (float32 parameters and optimizer state).
    "bfloat16": ("auto", jnp.bfloat16),
}
LEARNING_RATE = 0.05
MOMENTUM = 0.9


@dataclasses.dataclass
class CompiledTrainStep:
  """`run()` performs `steps_per_run` train steps from the same initial state."""
  name: str
  compile_seconds: float
  run: Callable[[], Any]


def optimizer() -> optax.GradientTransformation:
  """SGD with Nesterov momentum, as the PyTorch reference (benchmarks/torch_train_reference.py)."""
  return optax.sgd(LEARNING_RATE, momentum=MOMENTUM, nesterov=True)


def random_batch(shape: tuple[int, ...], num_classes: int, batch: int, seed: int) -> steps.Batch:
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.uniform(0, 1, (batch,) + tuple(shape)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32)}


def _step_fn(num_classes: int, fast: Any):
  return functools.partial(steps.train_step, num_classes=num_classes, fast_convolutions=fast)


def step_flops(model: nn.Module, shape: tuple[int, ...], num_classes: int, batch: int) -> float:
  """XLA's FLOP count of one plain train step, per image."""
  state = steps.create_train_state(jax.random.key(0), model, shape, optimizer())
  data = random_batch(shape, num_classes, batch, 0)
  compiled = jax.jit(_step_fn(num_classes, False)).lower(state, data, jax.random.key(0)).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan"))) / batch


def compile_train_step(model: nn.Module, shape: tuple[int, ...], num_classes: int, batch: int,
                       name: str, steps_per_run: int, seed: int) -> CompiledTrainStep:
  """Compiles `train_step` for implementation `name`; `run()` takes `steps_per_run` steps."""
  fast, dtype = IMPLEMENTATIONS[name]
  if dtype != jnp.float32:
    model = model.clone(dtype=dtype)
  state = steps.create_train_state(jax.random.key(seed), model, shape, optimizer())
  data = random_batch(shape, num_classes, batch, seed)
  key = jax.random.key(seed)
  lowered = jax.jit(_step_fn(num_classes, fast)).lower(state, data, key)
  start = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - start

  def run():
    current = state
    for _ in range(steps_per_run):
      current, metrics = compiled(current, data, key)
    return current, metrics

  return CompiledTrainStep(name, seconds, run)

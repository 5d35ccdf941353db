"""Measuring attack throughput: img*step/s, compile time, XLA's FLOP count and the matmul peak.

Everything a throughput claim needs is measured in the same process: the float32 matmul peak of
this machine (the denominator of "fraction of peak"), the FLOPs of one attack step from XLA's cost
analysis of the reference (plain autodiff) program, and interleaved timings of each attack
implementation, so machine noise hits every variant alike.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from adcorda_jax.attacks import compile as attack_compile
from adcorda_jax.attacks.losses import LogitsFn, objective_and_grad
from adcorda_jax.attacks.pgd import _pgd


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way of running the same attack: the model function and the XLA options it compiles with.

  `fast_input_gradients` selects `frozen_logits_fn`'s custom convolution VJP, `native_kernels`
  its native CPU convolution kernel, `fuse_layers` the folded conv -> BatchNorm -> ReLU layers
  with fused epilogues; `xla_defaults` compiles with XLA's default options instead of the attack
  programs' per-backend options.
  """
  name: str
  fast_input_gradients: bool
  xla_defaults: bool
  native_kernels: bool = False
  fuse_layers: bool = False

  def compiler_options(self, backend: str) -> dict[str, Any]:
    if self.xla_defaults:
      return {}
    # None: native convolutions wherever the kernel is available (compiler_options decides).
    native = None if self.native_kernels else False
    return dict(attack_compile.compiler_options(backend, native))


# Before/after ablation: plain autodiff with XLA defaults is the straightforward JAX program.
IMPLEMENTATIONS = {
    "autodiff": Implementation("autodiff", fast_input_gradients=False, xla_defaults=True),
    "autodiff_tuned_xla": Implementation("autodiff_tuned_xla", False, False),
    "fast_vjp": Implementation("fast_vjp", fast_input_gradients=True, xla_defaults=True),
    "fast_vjp_tuned_xla": Implementation("fast_vjp_tuned_xla", True, False),
    "adcorda_unfused": Implementation("adcorda_unfused", fast_input_gradients=True,
                                      xla_defaults=False, native_kernels=True),
    "adcorda": Implementation("adcorda", fast_input_gradients=True, xla_defaults=False,
                              native_kernels=True, fuse_layers=True),
}


def matmul_peak_gflops(size: int = 4096, repeats: int = 5) -> float:
  """Best float32 GFLOP/s of an XLA `size`x`size` matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best / 1e9


def step_flops(logits_fn: LogitsFn, params: Any, x: Any, labels: Any,
               compiler_options: dict[str, Any]) -> float:
  """XLA's FLOP count of one attack step (forward + input gradient) per image.

  Pass unsharded inputs: for a sharded program XLA reports one device's share.
  """
  def step(params, x, labels):
    return objective_and_grad(logits_fn, params, x, labels, False)[2]

  compiled = jax.jit(step).lower(params, x, labels).compile(compiler_options)
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan"))) / x.shape[0]


@dataclasses.dataclass
class CompiledAttack:
  """A compiled 10-step PGD program bound to its arguments; `run()` executes it once."""
  name: str
  compile_seconds: float
  run: Callable[[], Any]


def compile_pgd(logits_fn: LogitsFn, params: Any, x: jax.Array, labels: jax.Array, *,
                eps: float, step_size: float, steps: int, compiler_options: dict[str, Any],
                name: str) -> CompiledAttack:
  """Compiles L-inf PGD with random start and no early stopping (every step is taken)."""
  batch = x.shape[0]
  sharding = x.sharding
  key = jax.random.key(0)
  budget = jax.device_put(jnp.full((batch,), eps, jnp.float32), sharding)
  step = jax.device_put(jnp.full((batch,), step_size, jnp.float32), sharding)
  static = dict(steps=steps, norm="linf", targeted=False, random_start=True, restarts=1,
                early_stop=False)
  jitted = jax.jit(_pgd.__wrapped__, static_argnames=tuple(static) + ("logits_fn",))
  lowered = jitted.lower(logits_fn, params, x, labels, key, budget, step, **static)
  start = time.perf_counter()
  compiled = lowered.compile(compiler_options)
  seconds = time.perf_counter() - start
  return CompiledAttack(name, seconds, lambda: compiled(params, x, labels, key, budget, step))


def interleaved_seconds(attacks: list[CompiledAttack], repeats: int) -> dict[str, list[float]]:
  """Wall seconds per run of each attack, runs interleaved (A1 B1 C1 A2 B2 ...) after a warm-up."""
  for attack in attacks:
    jax.block_until_ready(attack.run())
  seconds: dict[str, list[float]] = {attack.name: [] for attack in attacks}
  for _ in range(repeats):
    for attack in attacks:
      start = time.perf_counter()
      jax.block_until_ready(attack.run())
      seconds[attack.name].append(time.perf_counter() - start)
  return seconds


def summarize(seconds: list[float], images: int, steps: int) -> dict[str, float]:
  """Median, best and worst img*step/s of timed runs."""
  rates = [images * steps / s for s in seconds]
  return {"img_steps_per_second": statistics.median(rates),
          "img_steps_per_second_max": max(rates), "img_steps_per_second_min": min(rates)}


def sub_mesh(devices: int) -> Mesh:
  """A 1-D data mesh over the first `devices` devices."""
  return Mesh(np.asarray(jax.devices()[:devices]), ("data",),
              axis_types=(jax.sharding.AxisType.Auto,))


def place(mesh: Mesh, params: Any, x: np.ndarray, labels: np.ndarray):
  """Params replicated, batch sharded along the mesh."""
  batch = NamedSharding(mesh, PartitionSpec("data"))
  return (jax.device_put(params, NamedSharding(mesh, PartitionSpec())),
          jax.device_put(x, batch), jax.device_put(labels, batch))

#!/usr/bin/env python3
"""Per-layer cost of a training step's convolutions: XLA's autodiff vs the native path.

    python benchmarks/train_conv_layers.py [--repeats 5] [--json out.json]

For every distinct convolution of small_cnn (28x28x1) and ResNet-20 (32x32x3) at batch 128, times
the three convolutions a training step runs: the forward pass, the input gradient (not needed
for a network's first layer) and the kernel gradient, as XLA compiles autodiff's versions with
its default options (what `jax.grad` of a flax model runs) and as `models.fast_path` runs them
(`fast_conv.input_gradient`, `native.conv2d.conv2d` / `kernel_gradient`). Each is compiled
alone and called 10 times in a row (a loop inside one program lets XLA hoist or rewrite the
work); both implementations are timed interleaved in this one process, best of --repeats. Read the ratios; absolute times move with the machine's load.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
from jax import lax

from adcorda_jax.models import fast_conv
from adcorda_jax.native import conv2d as native_conv

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
BATCH = 128
CHAIN = 10
# (label, height, channels in, channels out, kernel, stride, count in the model)
LAYERS = [
    ("small_cnn conv1", 28, 1, 32, 3, 1, 1),
    ("small_cnn conv2", 28, 32, 32, 3, 1, 1),
    ("small_cnn conv3", 14, 32, 64, 3, 1, 1),
    ("small_cnn conv4", 14, 64, 64, 3, 1, 1),
    ("resnet20 stem", 32, 3, 16, 3, 1, 1),
    ("resnet20 stage 1", 32, 16, 16, 3, 1, 6),
    ("resnet20 stage 2 entry", 32, 16, 32, 3, 2, 1),
    ("resnet20 stage 2 shortcut", 32, 16, 32, 1, 2, 1),
    ("resnet20 stage 2", 16, 32, 32, 3, 1, 5),
    ("resnet20 stage 3 entry", 16, 32, 64, 3, 2, 1),
    ("resnet20 stage 3 shortcut", 16, 32, 64, 1, 2, 1),
    ("resnet20 stage 3", 8, 64, 64, 3, 1, 5),
]


def _xla(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=DIMENSION_NUMBERS)


def _operations(strides, padding):
  """name -> {implementation: f(x, kernel, dy) -> array}."""
  def xla_input(x, kernel, dy):
    return jax.vjp(lambda v: _xla(v, kernel, strides, padding), x)[1](dy)[0]

  def xla_kernel(x, kernel, dy):
    return jax.vjp(lambda k: _xla(x, k, strides, padding), kernel)[1](dy)[0]

  return {
      "forward": {"xla": lambda x, k, dy: _xla(x, k, strides, padding),
                  "native": lambda x, k, dy: native_conv.conv2d(x, k, strides, padding)},
      "input_grad": {"xla": xla_input,
                     "native": lambda x, k, dy: fast_conv.input_gradient(
                         dy, k, x.shape, strides, padding, True)},
      "kernel_grad": {"xla": xla_kernel,
                      "native": lambda x, k, dy: native_conv.kernel_gradient(
                          x, dy, k.shape[:2], strides, padding)},
  }


def _program(op, x, kernel, dy):
  """One compiled call of `op`; the caller times CHAIN calls in a row."""
  compiled = jax.jit(op).lower(x, kernel, dy).compile()

  def run():
    for _ in range(CHAIN):
      out = compiled(x, kernel, dy)
    return out

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  if not native_conv.available():
    raise SystemExit("the native kernel is not available here (no C++ compiler, or not a CPU)")
  rows = []
  print(f"{'layer':28s} {'op':12s} {'XLA ms':>8s} {'native ms':>10s} {'speed-up':>9s} "
        f"{'native GFLOP/s':>15s}", flush=True)
  for label, height, c_in, c_out, size, stride, count in LAYERS:
    pad = size // 2
    strides, padding = (stride, stride), ((pad, pad), (pad, pad))
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (BATCH, height, height, c_in))
    kernel = jax.random.normal(keys[1], (size, size, c_in, c_out)) * 0.1
    out = jax.eval_shape(lambda: _xla(x, kernel, strides, padding)).shape
    dy = jax.random.normal(keys[2], out)
    flops = 2.0 * BATCH * out[1] * out[2] * size * size * c_in * c_out
    for op_name, implementations in _operations(strides, padding).items():
      if op_name == "input_grad" and label.endswith(("conv1", "stem")):
        continue  # A first layer's input gradient is never computed in training.
      programs = {name: _program(op, x, kernel, dy) for name, op in implementations.items()}
      best = {name: float("inf") for name in programs}
      for run in programs.values():
        jax.block_until_ready(run())
      for _ in range(args.repeats):
        for name, run in programs.items():
          start = time.perf_counter()
          jax.block_until_ready(run())
          best[name] = min(best[name], (time.perf_counter() - start) / CHAIN)
      rows.append({"layer": label, "op": op_name, "count": count,
                   "xla_ms": 1e3 * best["xla"], "native_ms": 1e3 * best["native"],
                   "speedup": best["xla"] / best["native"],
                   "native_gflops": flops / best["native"] / 1e9})
      r = rows[-1]
      print(f"{label:28s} {op_name:12s} {r['xla_ms']:8.2f} {r['native_ms']:10.2f} "
            f"{r['speedup']:8.2f}x {r['native_gflops']:15.0f}", flush=True)
  for model in ("small_cnn", "resnet20"):
    mine = [r for r in rows if r["layer"].startswith(model)]
    xla = sum(r["xla_ms"] * r["count"] for r in mine)
    native = sum(r["native_ms"] * r["count"] for r in mine)
    print(f"{model}: all convolutions of one step {xla:.1f} ms (XLA) vs {native:.1f} ms "
          f"(native), {xla / native:.2f}x", flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()

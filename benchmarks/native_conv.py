#!/usr/bin/env python3
"""Native CPU convolution vs XLA:CPU's, per convolution shape of ResNet-20 and the small CNN.

    python benchmarks/native_conv.py [--repeats 5] [--json out.json]

Each shape runs as 20 convolutions (kernel rescaled each time) in one compiled `fori_loop`, both
implementations timed interleaved in this one process, with YNNPACK fusions off (XLA's faster
setting for its own convolutions). Read the ratio; absolute times move with the machine's load.
The native kernel is the variant tuned for this CPU (printed); `ADCORDA_NATIVE_VARIANT=<name>`
times another, e.g. `zmm-t12x8-p8` (the previous release's blocking) or `default`.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
from jax import lax

from adcorda_jax.attacks.compile import compiler_options
from adcorda_jax.native import build
from adcorda_jax.native import conv2d as native_conv

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# (label, batch, height, channels in, channels out, stride): 3x3, padding 1.
SHAPES = [
    ("resnet20 stem", 256, 32, 3, 16, 1),
    ("resnet20 stage 1", 256, 32, 16, 16, 1),
    ("resnet20 stage 2", 256, 16, 32, 32, 1),
    ("resnet20 stage 3", 256, 8, 64, 64, 1),
    ("resnet20 stage 2 entry (stride 2)", 256, 32, 16, 32, 2),
    ("small_cnn block 1", 512, 28, 32, 32, 1),
    ("small_cnn block 2", 512, 14, 64, 64, 1),
]
CHAIN = 20


def _program(conv, shape):
  _, batch, height, c_in, c_out, stride = shape
  x = jax.random.normal(jax.random.key(0), (batch, height, height, c_in))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out)) * 0.1

  def chain(x, kernel):
    def body(i, _):
      # A per-iteration kernel keeps XLA from hoisting the convolution out of the loop.
      scaled = kernel * (1.0 + 1e-7 * i.astype(jnp.float32))
      return conv(x, scaled, (stride, stride), ((1, 1), (1, 1)))
    out = height // stride
    return lax.fori_loop(0, CHAIN, body, jnp.zeros((batch, out, out, c_out), jnp.float32))

  compiled = jax.jit(chain).lower(x, kernel).compile(
      dict(compiler_options("cpu", native_convolutions=False)))  # XLA's convs at their best.
  return lambda: compiled(x, kernel)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  if not native_conv.available():
    raise SystemExit("the native kernel is not available here (no C++ compiler, or not a CPU)")
  xla = lambda x, k, s, p: lax.conv_general_dilated(x, k, s, p,
                                                    dimension_numbers=DIMENSION_NUMBERS)
  rows = []
  variant = build.conv2d_kernel().variant
  print(f"native kernel variant: {variant} (set ADCORDA_NATIVE_VARIANT to compare others)")
  print(f"{'shape':36s} {'XLA ms':>8s} {'native ms':>10s} {'speed-up':>9s} {'native GFLOP/s':>15s}")
  for shape in SHAPES:
    label, batch, height, c_in, c_out, stride = shape
    programs = {"xla": _program(xla, shape), "native": _program(native_conv.conv2d, shape)}
    best = {name: float("inf") for name in programs}
    for run in programs.values():
      jax.block_until_ready(run())
    for _ in range(args.repeats):
      for name, run in programs.items():
        start = time.perf_counter()
        jax.block_until_ready(run())
        best[name] = min(best[name], (time.perf_counter() - start) / CHAIN)
    out = height // stride
    flops = 2.0 * batch * out * out * 9 * c_in * c_out
    rows.append({"shape": label, "xla_ms": 1e3 * best["xla"], "native_ms": 1e3 * best["native"],
                 "speedup": best["xla"] / best["native"],
                 "native_gflops": flops / best["native"] / 1e9, "native_variant": variant})
    r = rows[-1]
    print(f"{label:36s} {r['xla_ms']:8.2f} {r['native_ms']:10.2f} {r['speedup']:8.2f}x "
          f"{r['native_gflops']:15.0f}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()

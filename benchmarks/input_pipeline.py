"""Train-step throughput with the training split on the devices vs prefetched from the host.

    python benchmarks/input_pipeline.py [--model small_cnn] [--batch 128] [--steps 60] [--rounds 5]

Runs the library's jitted `train_step` on a Fashion-MNIST-sized random split (55,000 x 28x28x1)
with each input placement, rounds interleaved, and prints examples/s (median of rounds) for:
`device` (split resident, batch gathered by index), `host` (slice + transfer, next batch
prefetched in a thread) and `host_sync` (slice + transfer in the loop, the previous behaviour).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import numpy as np
import optax

from adcorda_jax.models import create_model
from adcorda_jax.training import batches, input_pipeline, sharding, steps


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="small_cnn")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--examples", type=int, default=55_000)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  split = {"image": rng.uniform(size=(args.examples, 28, 28, 1)).astype(np.float32),
           "label": rng.integers(0, 10, args.examples).astype(np.int32)}
  mesh = sharding.make_mesh()
  model = create_model({"name": args.model}, 10, mean=(0.5,), std=(0.25,))
  tx = optax.sgd(0.01, momentum=0.9, nesterov=True)
  state0 = jax.jit(functools.partial(steps.create_train_state, model=model,
                                     image_shape=(28, 28, 1), tx=tx))(jax.random.key(0))
  train_step = jax.jit(functools.partial(steps.train_step, num_classes=10))
  key = jax.random.key(1)

  def host_sync(step):
    indices = batches.train_batch_indices(args.examples, args.batch, step, 0)
    return sharding.put_batch({k: v[indices] for k, v in split.items()}, mesh)

  feeds = {
      "device": input_pipeline.BatchStream(split, args.batch, 0, mesh,
                                           input_pipeline.InputSettings("device")),
      "host": input_pipeline.BatchStream(split, args.batch, 0, mesh,
                                         input_pipeline.InputSettings("host")),
      "host_sync": host_sync,
  }
  state = state0
  for feed in feeds.values():  # Compile and warm up.
    for step in range(3):
      state, metrics = train_step(state, feed(step), key)
  jax.block_until_ready(metrics)

  rates: dict[str, list[float]] = {name: [] for name in feeds}
  for round_ in range(args.rounds):
    for name, feed in feeds.items():
      start_step = 1000 * (round_ + 1)
      state = state0
      begin = time.perf_counter()
      for step in range(start_step, start_step + args.steps):
        state, metrics = train_step(state, feed(step), key)
      jax.block_until_ready(metrics)
      rates[name].append(args.steps * args.batch / (time.perf_counter() - begin))
  for feed in feeds.values():
    if hasattr(feed, "close"):
      feed.close()
  summary = {name: round(statistics.median(values), 1) for name, values in rates.items()}
  print(json.dumps({"backend": jax.default_backend(), "devices": jax.device_count(),
                    "model": args.model, "batch": args.batch, "examples_per_second": summary,
                    "rounds": {k: [round(v, 1) for v in vs] for k, vs in rates.items()}}))


if __name__ == "__main__":
  main()

#!/usr/bin/env python3
"""PyTorch reference throughput for one training step, to compare with `task=benchmark_train`.

Standalone: needs only torch and numpy (the models are torch_pgd_reference.py's mirrors of
adcorda_jax's `small_cnn` and `resnet20`, imported from this folder).

Step: train mode (BatchNorm batch statistics), random data, mean cross-entropy, backward, SGD
with Nesterov momentum (lr 0.05, momentum 0.9, no weight decay), as
`adcorda_jax.training.benchmark.optimizer()`. Cases: small_cnn 28x28x1 and resnet20 32x32x3,
10 classes, batch 128 (`--batch`).

Variants:
  eager         : NCHW (contiguous) model and inputs
  channels_last : eager, model and inputs in torch.channels_last memory format
  compile       : torch.compile of the whole step (forward, backward and optimizer), default mode

Protocol: per (model, variant) a warm-up run (includes torch.compile time; not counted), then
--repeats rounds in which every variant runs --steps steps, interleaved (A1 B1 C1 A2 ...).
Throughput = batch * steps / wall seconds (img/s); median, min and max over the rounds.

Example (right after `python main.py --config configs/benchmark_train.py --workdir W`):
  /tmp/torchvenv/bin/python benchmarks/torch_train_reference.py --repeats 5 --json torch_train.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_pgd_reference import ResNetCifar, SmallCNN  # noqa: E402

LEARNING_RATE = 0.05
MOMENTUM = 0.9
SEED = 0
ALL_MODELS = ("small_cnn", "resnet20")
ALL_VARIANTS = ("eager", "channels_last", "compile")
# name -> (builder, NCHW input shape without batch)
MODELS = {
    "small_cnn": (lambda classes: SmallCNN(num_classes=classes), (1, 28, 28)),
    "resnet20": (lambda classes: ResNetCifar(num_classes=classes, blocks_per_stage=3),
                 (3, 32, 32)),
}


def make_step(variant, base_model, images, labels):
  """(step(), model): one training step of `variant` on fixed data."""
  model = copy.deepcopy(base_model).train()
  if variant == "channels_last":
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                              nesterov=True)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss

  if variant == "compile":
    step = torch.compile(step)
  elif variant not in ("eager", "channels_last"):
    raise ValueError(f"unknown variant {variant!r}")
  return step


def timed(step, steps):
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  float(loss)  # Waits for the last step.
  return time.perf_counter() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(ALL_MODELS))
  parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=10, help="train steps per timed run")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None, help="write the records here")
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  variants = [v for v in args.variants.split(",") if v]
  for name in models:
    if name not in MODELS:
      parser.error(f"--models: unknown model {name!r}; valid: {', '.join(ALL_MODELS)}")
  for variant in variants:
    if variant not in ALL_VARIANTS:
      parser.error(f"--variants: unknown variant {variant!r}; valid: {', '.join(ALL_VARIANTS)}")
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}", flush=True)
  records = []
  for name in models:
    torch.manual_seed(SEED)
    builder, shape = MODELS[name]
    base = builder(args.classes)
    rng = np.random.default_rng(SEED)
    images = torch.from_numpy(rng.uniform(0, 1, (args.batch,) + shape).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, args.classes, args.batch).astype(np.int64))
    step_fns, warmup = {}, {}
    for variant in variants:
      step_fns[variant] = make_step(variant, base, images, labels)
      warmup[variant] = timed(step_fns[variant], args.steps)
    seconds = {variant: [] for variant in variants}
    for _ in range(args.repeats):
      for variant in variants:
        seconds[variant].append(timed(step_fns[variant], args.steps))
    for variant in variants:
      rates = [args.batch * args.steps / s for s in seconds[variant]]
      record = {"framework": "torch", "variant": variant, "model": name, "batch": args.batch,
                "num_classes": args.classes, "img_per_second": statistics.median(rates),
                "img_per_second_min": min(rates), "img_per_second_max": max(rates),
                "steps": args.steps, "repeats": args.repeats, "warmup_seconds": warmup[variant],
                "seconds_per_run": seconds[variant], "torch_version": torch.__version__,
                "threads": torch.get_num_threads()}
      records.append(record)
      print(f"{name} b{args.batch} {variant}: {record['img_per_second']:.0f} img/s "
            f"({record['img_per_second_min']:.0f}-{record['img_per_second_max']:.0f})",
            flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as handle:
      json.dump(records, handle, indent=2)
  return records


if __name__ == "__main__":
  main()

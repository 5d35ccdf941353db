#!/usr/bin/env python3
"""PyTorch reference throughput for one training step, to compare with `task=benchmark_train`.

Standalone: needs only torch and numpy (the models are torch_pgd_reference.py's mirrors of
adcorda_jax's `small_cnn` and `resnet20`, imported from this folder, as are the device helpers).

Step: train mode (BatchNorm batch statistics), random data, mean cross-entropy, backward, SGD
with Nesterov momentum (lr 0.05, momentum 0.9, no weight decay), as
`adcorda_jax.training.benchmark.optimizer()`. Cases: small_cnn 28x28x1 and resnet20 32x32x3,
10 classes (`--classes`), batch 128 (`--batch`; a comma list such as `--batch 128,1024` runs
every model at each batch, one case per (model, batch)).

Variants (`--variants`, comma-separated; default eager,channels_last,compile):
  eager                     : NCHW (contiguous) model and inputs, float32
  channels_last             : eager, model and inputs in torch.channels_last memory format
  compile                   : torch.compile of the whole step (forward, backward and optimizer),
                              default mode, NCHW, float32
  amp_channels_last         : eager, channels_last, torch.autocast(device, dtype=bfloat16)
                              around forward and loss (float32 parameters and optimizer; no
                              loss scaling). Works on CPU and CUDA.
  amp_fp16_channels_last    : as amp_channels_last with float16 autocast and a
                              torch.amp.GradScaler (scale, step, update every step; its inf
                              check syncs the host once per step). Meant for CUDA; runs (slowly)
                              on CPU too, for smoke tests.
  compile_amp_channels_last : torch.compile of the amp_channels_last step (bfloat16 autocast)

Device: `--device cpu` (default), `cuda` / `cuda:N`, or `auto` (cuda if available, else cpu).
Model, inputs and labels live on that device (data drawn on the CPU from the fixed seed, then
copied). On CUDA torch.backends.cudnn.benchmark is set and torch.cuda.synchronize() runs before
each timer starts and before it stops. torch._dynamo is reset before each (model, batch) case.
`--float32-matmul-precision` and `--keep-going` as in torch_pgd_reference.py.

Protocol: per (model, batch, variant) a warm-up run of --steps steps (includes torch.compile
and cuDNN autotuning time; not counted), then --repeats rounds in which every variant runs
--steps steps, interleaved (A1 B1 C1 A2 ...). Throughput = batch * steps / wall seconds (img/s);
median, min and max over the rounds.

JSON records (`--json`), one per (model, batch, variant): framework, variant, model, batch,
num_classes, img_per_second (median), img_per_second_min, img_per_second_max, steps, repeats,
warmup_seconds, seconds_per_run, torch_version, threads, memory_format ("contiguous" /
"channels_last"), amp_dtype (null / "bfloat16" / "float16"), grad_scaler, compiled, device,
device_name, cuda_version, cudnn_version, cudnn_benchmark, cudnn_allow_tf32,
float32_matmul_precision; plus `error` (and null rates) for a variant dropped under --keep-going.

Examples (right after `python main.py --config configs/benchmark_train.py --workdir W`):
  /tmp/torchvenv/bin/python benchmarks/torch_train_reference.py --repeats 5 --json torch_train.json
  python benchmarks/torch_train_reference.py --device cuda --batch 128,1024 --repeats 5 \
      --variants eager,channels_last,compile,amp_channels_last,amp_fp16_channels_last \
      --json torch_train_gpu.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_bench_common import (  # noqa: E402
    add_device_arguments, describe_device, device_info, failure, interleaved_seconds,
    parse_sizes, release_memory, reset_compiled, setup_device, synchronize)
from torch_pgd_reference import ResNetCifar, SmallCNN  # noqa: E402

LEARNING_RATE = 0.05
MOMENTUM = 0.9
SEED = 0
ALL_MODELS = ("small_cnn", "resnet20")
DEFAULT_VARIANTS = ("eager", "channels_last", "compile")
# variant -> (channels_last, autocast dtype or None, GradScaler, torch.compile)
VARIANT_SPECS = {
    "eager": (False, None, False, False),
    "channels_last": (True, None, False, False),
    "compile": (False, None, False, True),
    "amp_channels_last": (True, torch.bfloat16, False, False),
    "amp_fp16_channels_last": (True, torch.float16, True, False),
    "compile_amp_channels_last": (True, torch.bfloat16, False, True),
}
ALL_VARIANTS = tuple(VARIANT_SPECS)
# name -> (builder, NCHW input shape without batch)
MODELS = {
    "small_cnn": (lambda classes: SmallCNN(num_classes=classes), (1, 28, 28)),
    "resnet20": (lambda classes: ResNetCifar(num_classes=classes, blocks_per_stage=3),
                 (3, 32, 32)),
}


def make_step(variant, base_model, images, labels):
  """step(): one training step of `variant` on fixed data (on base_model's device)."""
  if variant not in VARIANT_SPECS:
    raise ValueError(f"unknown variant {variant!r}")
  channels_last, amp_dtype, grad_scaler, compiled = VARIANT_SPECS[variant]
  device_type = images.device.type
  model = copy.deepcopy(base_model).train()
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                              nesterov=True)

  # Separate functions (code objects) per kind, so two compiled variants never share a cache.
  if amp_dtype is None:
    def step():
      optimizer.zero_grad(set_to_none=True)
      loss = F.cross_entropy(model(images), labels)
      loss.backward()
      optimizer.step()
      return loss
  elif not grad_scaler:
    def step():
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device_type, dtype=amp_dtype):
        loss = F.cross_entropy(model(images), labels)
      loss.backward()
      optimizer.step()
      return loss
  else:
    scaler = torch.amp.GradScaler(device_type)

    def step():
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast(device_type, dtype=amp_dtype):
        loss = F.cross_entropy(model(images), labels)
      scaler.scale(loss).backward()
      scaler.step(optimizer)
      scaler.update()
      return loss

  if compiled:
    step = torch.compile(step)
  return step


def timed(step, steps, device):
  synchronize(device)
  start = time.perf_counter()
  for _ in range(steps):
    loss = step()
  float(loss.detach())  # Waits for the last step (on CUDA the synchronize below makes it explicit).
  synchronize(device)
  return time.perf_counter() - start


def parse_batches(text, parser):
  return parse_sizes(text, parser, "--batch")


def run_case(name, batch, variants, args, device, info):
  """Warm-up plus interleaved timed runs of every variant for one (model, batch)."""
  reset_compiled()
  torch.manual_seed(SEED)
  builder, shape = MODELS[name]
  base = builder(args.classes).to(device)
  rng = np.random.default_rng(SEED)
  images = torch.from_numpy(rng.uniform(0, 1, (batch,) + shape).astype(np.float32)).to(device)
  labels = torch.from_numpy(rng.integers(0, args.classes, batch).astype(np.int64)).to(device)
  step_fns, warmup, errors = {}, {}, {}

  for variant in variants:
    try:
      step_fns[variant] = make_step(variant, base, images, labels)
      warmup[variant] = timed(step_fns[variant], args.steps, device)
    except Exception:  # Swallowed only under --keep-going.
      if not args.keep_going:
        raise
      errors[variant] = failure(f"{name} b{batch}", variant, "warm-up")
    if variant in errors:
      step_fns.pop(variant, None)
      release_memory(device)
  runs = {variant: (lambda step=step: timed(step, args.steps, device))
          for variant, step in step_fns.items()}
  seconds = interleaved_seconds(runs, args.repeats, device, args.keep_going,
                                f"{name} b{batch}", errors)
  records = []
  for variant in variants:
    channels_last, amp_dtype, grad_scaler, compiled = VARIANT_SPECS[variant]
    ok = variant not in errors
    rates = [batch * args.steps / s for s in seconds.get(variant, [])] if ok else []
    record = {"framework": "torch", "variant": variant, "model": name, "batch": batch,
              "num_classes": args.classes,
              "img_per_second": statistics.median(rates) if rates else None,
              "img_per_second_min": min(rates) if rates else None,
              "img_per_second_max": max(rates) if rates else None,
              "steps": args.steps, "repeats": args.repeats,
              "warmup_seconds": warmup.get(variant) if ok else None,
              "seconds_per_run": seconds[variant] if ok else [],
              "torch_version": torch.__version__, "threads": torch.get_num_threads(),
              "memory_format": "channels_last" if channels_last else "contiguous",
              "amp_dtype": None if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
              "grad_scaler": grad_scaler, "compiled": compiled, **info}
    if not ok:
      record["error"] = errors[variant]
      print(f"{name} b{batch} {variant}: failed ({errors[variant]})", flush=True)
    else:
      print(f"{name} b{batch} {variant}: {record['img_per_second']:.0f} img/s "
            f"({record['img_per_second_min']:.0f}-{record['img_per_second_max']:.0f})",
            flush=True)
    records.append(record)
  del step_fns, base, images, labels
  release_memory(device)
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(ALL_MODELS),
                      help=f"comma-separated subset of {', '.join(ALL_MODELS)}")
  parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                      help=f"comma-separated subset of {', '.join(ALL_VARIANTS)}")
  parser.add_argument("--batch", default="128",
                      help="batch size, or a comma list (one case per model and batch)")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=10, help="train steps per timed run")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None, help="write the records here")
  add_device_arguments(parser)
  args = parser.parse_args(argv)
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  for name in models:
    if name not in MODELS:
      parser.error(f"--models: unknown model {name!r}; valid: {', '.join(ALL_MODELS)}")
  for variant in variants:
    if variant not in VARIANT_SPECS:
      parser.error(f"--variants: unknown variant {variant!r}; valid: {', '.join(ALL_VARIANTS)}")
  if args.steps < 1 or args.repeats < 1:
    parser.error("--steps and --repeats must be >= 1")
  batches = parse_batches(args.batch, parser)
  device = setup_device(args, parser)
  info = device_info(device)
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{describe_device(info)}", flush=True)
  records = []
  for name in models:
    for batch in batches:
      records.extend(run_case(name, batch, variants, args, device, info))
  if args.json:
    with open(args.json, "w", encoding="utf-8") as handle:
      json.dump(records, handle, indent=2)
  return records


if __name__ == "__main__":
  main()

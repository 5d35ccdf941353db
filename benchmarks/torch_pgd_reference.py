#!/usr/bin/env python3
"""PyTorch reference throughput for 10-step L-inf PGD, to compare against adcorda_jax.

Standalone: needs only torch, numpy and the standard library (torchattacks is used when it is
importable, otherwise an exact re-implementation of `torchattacks.PGD.forward` is used; pass
`--pgd-impl` to force one or the other).

Attack: untargeted L-inf PGD, eps 8/255, step 2/255, 10 steps, uniform random start in
[-eps, eps] clamped to [0, 1], cross-entropy loss (mean over the batch), as torchattacks.PGD.

Models (random init, eval mode, parameters frozen; only the input requires grad), mirroring
adcorda_jax/models exactly in layer structure (the batch is each model's default; see --batches):
  small_cnn : 28x28x1, 10 classes, batch 512
              normalize -> [conv3x3(32)-BN-ReLU] x2 -> maxpool2 -> [conv3x3(64)-BN-ReLU] x2
              -> maxpool2 -> flatten -> Linear(3136,128)-ReLU -> dropout(eval) -> Linear(128,10)
  resnet20  : 32x32x3, 100 classes, batch 256
              normalize -> conv3x3(16)-BN-ReLU -> 3 stages x 3 BasicBlocks (16/32/64, strides
              1/2/2, 1x1 conv+BN projection shortcut when shape changes) -> GAP -> Linear(64,100)
  All convs bias-free, BatchNorm eps 1e-5.

Variants (all run the same PGD loop):
  torchattacks  : eager, NCHW (contiguous) model and inputs
  channels_last : eager, model and inputs in torch.channels_last memory format
  compile       : torch.compile(model) (default mode), NCHW inputs

Cases: one per (model, batch). By default each model runs only its default batch above;
`--batches` overrides that (repeatable; later specs win; models not named keep their default):
  --batches 64,1024                     every selected model at batch 64, then at batch 1024
  --batches small_cnn=512,4096 --batches resnet20=256,2048
  --batches 'small_cnn=512,4096;resnet20=256,2048'   (the same, in one quoted argument)

Device: `--device cpu` (default), `cuda` / `cuda:N`, or `auto` (cuda if available, else cpu).
Models, inputs and labels live on that device (the data are drawn on the CPU from the fixed seed
and copied, so every device attacks the same images). On CUDA: torch.backends.cudnn.benchmark is
set, and torch.cuda.synchronize() runs before each timer starts and before it stops (the
warm-up attack also absorbs cuDNN autotuning). Torch's TF32 defaults are left alone unless
`--float32-matmul-precision` is given (both settings are recorded).

Protocol: per (model, batch) case, one full attack per variant as warm-up (includes
torch.compile time; not counted), then --repeats rounds in which every variant runs one full
attack, interleaved (A1 B1 C1 A2 B2 C2 ...). Throughput = batch * steps / wall seconds of one
attack (img*step/s); median and min over repeats are reported. Threads: torch's default
(printed). torch._dynamo is reset before each case, so no compiled code (or dynamic-shape
guess) carries over from one batch size to the next. `--keep-going`: a variant that raises
(e.g. CUDA out of memory, compile failure) is reported, recorded with an `error` field and
dropped from its case instead of ending the run.

JSON records (`--json`), one per (model, batch, variant): framework, variant, model, batch,
img_steps_per_second_median, img_steps_per_second_min, repeats, torch_version, threads,
device ("cpu" / "cuda" / "cuda:N"), device_name (GPU name, or the CPU model), cuda_version,
cudnn_version (None on CPU), cudnn_benchmark, cudnn_allow_tf32, float32_matmul_precision,
steps, pgd_impl, warmup_seconds, attack_seconds (per repeat); plus `error` (and null rates)
for a variant dropped under --keep-going.

Examples:
  nice -n 19 /tmp/torchvenv/bin/python benchmarks/torch_pgd_reference.py --repeats 5 \
      --json torch_pgd.json
  python benchmarks/torch_pgd_reference.py --device cuda --repeats 5 \
      --batches small_cnn=512,4096 --batches resnet20=256,2048 --json torch_pgd_gpu.json
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
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_bench_common import (  # noqa: E402
    add_device_arguments, describe_device, device_info, failure, interleaved_seconds,
    parse_sizes, release_memory, reset_compiled, setup_device, synchronize)

EPS = 8 / 255
ALPHA = 2 / 255
STEPS = 10
SEED = 0

ALL_MODELS = ("small_cnn", "resnet20")
ALL_VARIANTS = ("torchattacks", "channels_last", "compile")


# ----------------------------------------------------------------------------------- models


class Normalize(nn.Module):
  """(x - mean) / std with per-channel (or scalar) constants, inside the model."""

  def __init__(self, mean, std):
    super().__init__()
    self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
    self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

  def forward(self, x):
    return (x - self.mean) / self.std


def conv3x3(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def bn(c):
  return nn.BatchNorm2d(c, eps=1e-5)


class SmallCNN(nn.Module):
  """adcorda_jax.models.small_cnn.SmallCNN at width 1 for 28x28x1 inputs."""

  def __init__(self, num_classes=10, in_channels=1, image_size=28, mean=(0.2860,), std=(0.3530,),
               dropout=0.0):
    super().__init__()
    self.normalize = Normalize(mean, std)
    self.conv1, self.bn1 = conv3x3(in_channels, 32), bn(32)
    self.conv2, self.bn2 = conv3x3(32, 32), bn(32)
    self.conv3, self.bn3 = conv3x3(32, 64), bn(64)
    self.conv4, self.bn4 = conv3x3(64, 64), bn(64)
    size = image_size // 2
    # Second pool only when the map after the first pool is >= 8 (as in the JAX model).
    self.second_pool = size >= 8
    if self.second_pool:
      size //= 2
    self.hidden = nn.Linear(64 * size * size, 128)
    self.dropout = nn.Dropout(dropout)
    self.classifier = nn.Linear(128, num_classes)

  def forward(self, x):
    x = self.normalize(x)
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.relu(self.bn2(self.conv2(x)))
    x = F.max_pool2d(x, 2)
    x = F.relu(self.bn3(self.conv3(x)))
    x = F.relu(self.bn4(self.conv4(x)))
    if self.second_pool:
      x = F.max_pool2d(x, 2)
    x = torch.flatten(x, 1)  # JAX flattens NHWC; the order does not matter for speed.
    x = F.relu(self.hidden(x))
    x = self.dropout(x)
    return self.classifier(x)


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN + (identity | 1x1 conv(stride)+BN), then ReLU."""

  def __init__(self, cin, cout, stride=1):
    super().__init__()
    self.conv1, self.bn1 = conv3x3(cin, cout, stride), bn(cout)
    self.conv2, self.bn2 = conv3x3(cout, cout), bn(cout)
    self.shortcut = None
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), bn(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    residual = x if self.shortcut is None else self.shortcut(x)
    return F.relu(y + residual)


class ResNetCifar(nn.Module):
  """adcorda_jax.models.resnet_cifar.ResNetCifar (option-B shortcuts), depth 6n+2."""

  def __init__(self, num_classes=100, blocks_per_stage=3,
               mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)):
    super().__init__()
    self.normalize = Normalize(mean, std)
    self.conv1, self.bn1 = conv3x3(3, 16), bn(16)
    blocks, cin = [], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
      for b in range(blocks_per_stage):
        blocks.append(BasicBlock(cin, cout, stride if b == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.classifier = nn.Linear(64, num_classes)

  def forward(self, x):
    x = self.normalize(x)
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.blocks(x)
    x = x.mean(dim=(2, 3))
    return self.classifier(x)


# name -> (builder, input shape NCHW without batch, num_classes, default batch)
MODEL_SPECS = {
    "small_cnn": (lambda: SmallCNN(num_classes=10), (1, 28, 28), 10, 512),
    "resnet20": (lambda: ResNetCifar(num_classes=100, blocks_per_stage=3), (3, 32, 32), 100, 256),
}


# ------------------------------------------------------------------------------------ attack


class ReimplPGD:
  """Exact re-implementation of torchattacks.PGD (untargeted, random start) forward()."""

  def __init__(self, model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True):
    self.model, self.eps, self.alpha = model, eps, alpha
    self.steps, self.random_start = steps, random_start

  def __call__(self, images, labels):
    self.model.eval()
    images = images.clone().detach()
    labels = labels.clone().detach()
    loss = nn.CrossEntropyLoss()
    adv_images = images.clone().detach()
    if self.random_start:
      adv_images = adv_images + torch.empty_like(adv_images).uniform_(-self.eps, self.eps)
      adv_images = torch.clamp(adv_images, min=0, max=1).detach()
    for _ in range(self.steps):
      adv_images.requires_grad = True
      outputs = self.model(adv_images)
      cost = loss(outputs, labels)
      grad = torch.autograd.grad(cost, adv_images, retain_graph=False, create_graph=False)[0]
      adv_images = adv_images.detach() + self.alpha * grad.sign()
      delta = torch.clamp(adv_images - images, min=-self.eps, max=self.eps)
      adv_images = torch.clamp(images + delta, min=0, max=1).detach()
    return adv_images


def make_attack_factory(impl):
  """Returns (factory(model) -> attack, description)."""
  if impl in ("auto", "torchattacks"):
    try:
      import torchattacks  # noqa: PLC0415
    except ImportError:
      if impl == "torchattacks":
        raise
    else:
      def factory(model):
        return torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
      return factory, f"torchattacks {torchattacks.__version__} PGD"
  return (lambda model: ReimplPGD(model)), "re-implementation of torchattacks.PGD"


# --------------------------------------------------------------------------------- benchmark


def prepare_variant(variant, base_model, images):
  model = copy.deepcopy(base_model).eval()
  for p in model.parameters():
    p.requires_grad_(False)
  if variant == "torchattacks":
    return model, images.contiguous()
  if variant == "channels_last":
    model = model.to(memory_format=torch.channels_last)
    return model, images.contiguous(memory_format=torch.channels_last)
  if variant == "compile":
    return torch.compile(model), images.contiguous()
  raise ValueError(f"unknown variant {variant!r}")


def time_attack(attack, images, labels, device):
  synchronize(device)
  start = time.perf_counter()
  adv = attack(images, labels)
  synchronize(device)
  elapsed = time.perf_counter() - start
  # Sanity: stays inside the eps ball and [0, 1].
  assert float((adv - images).abs().max()) <= EPS + 1e-6
  return elapsed



def parse_batches(specs, models, parser):
  """--batches specs -> {model: [batch, ...]} for the selected models (defaults otherwise)."""
  batches = {m: [MODEL_SPECS[m][3]] for m in models}
  for spec in specs or ():
    for part in spec.split(";"):
      part = part.strip()
      if not part:
        continue
      if "=" in part:
        name, values = (t.strip() for t in part.split("=", 1))
        if name not in MODEL_SPECS:
          parser.error(f"--batches {part!r}: unknown model {name!r}; choose from {ALL_MODELS}")
        targets = [name] if name in batches else []  # A model not in --models: ignored.
      else:
        targets, values = list(models), part
      sizes = parse_sizes(values, parser, f"--batches {part!r}")
      for target in targets:
        batches[target] = sizes
  return batches


def run_case(model_name, batch, variants, factory, impl_desc, args, device, info):
  """Warm-up plus interleaved timed attacks of every variant for one (model, batch)."""
  builder, shape, num_classes, _ = MODEL_SPECS[model_name]
  tag = f"[{model_name} b{batch}]"
  reset_compiled()
  torch.manual_seed(SEED)
  base_model = builder().eval().to(device)
  images = torch.rand((batch,) + shape).to(device)
  labels = torch.randint(0, num_classes, (batch,)).to(device)
  threads = torch.get_num_threads()

  def record(variant, times, warmup, error=None):
    rates = [batch * STEPS / t for t in times]
    rec = {
        "framework": "torch",
        "variant": variant,
        "model": model_name,
        "batch": batch,
        "img_steps_per_second_median": statistics.median(rates) if rates else None,
        "img_steps_per_second_min": min(rates) if rates else None,
        "repeats": args.repeats,
        "torch_version": torch.__version__,
        "threads": threads,
        **info,
        # Extra context (not needed for the comparison itself).
        "steps": STEPS,
        "pgd_impl": impl_desc,
        "warmup_seconds": warmup,
        "attack_seconds": times,
    }
    if error is not None:
      rec["error"] = error
    return rec

  setups, errors = {}, {}
  for variant in variants:
    torch.manual_seed(SEED)
    try:
      model, var_images = prepare_variant(variant, base_model, images)
      attack = factory(model)
      warmup = time_attack(attack, var_images, labels, device)
    except Exception:  # Swallowed only under --keep-going.
      if not args.keep_going:
        raise
      errors[variant] = failure(tag, variant, "warm-up")
    if variant in errors:
      release_memory(device)  # Outside the except block: the traceback no longer pins memory.
      continue
    print(f"{tag} {variant}: warm-up attack {warmup:.2f}s", flush=True)
    setups[variant] = (attack, var_images, warmup)

  def report(variant, rep, elapsed):
    print(f"{tag} rep {rep + 1}/{args.repeats} {variant}: {elapsed:.3f}s "
          f"({batch * STEPS / elapsed:.1f} img*step/s)", flush=True)

  runs = {variant: (lambda setup=setups[variant], labels=labels:
                    time_attack(setup[0], setup[1], labels, device))
          for variant in variants if variant in setups}
  times = interleaved_seconds(runs, args.repeats, device, args.keep_going, tag, errors, report)
  for variant in errors:
    setups.pop(variant, None)

  records = []
  for variant in variants:
    warmup = setups[variant][2] if variant in setups else None
    records.append(record(variant, times.get(variant, []) if variant in setups else [], warmup,
                          errors.get(variant)))
  del setups, base_model, images, labels
  release_memory(device)
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(ALL_MODELS),
                      help=f"comma-separated subset of {ALL_MODELS}")
  parser.add_argument("--variants", default=",".join(ALL_VARIANTS),
                      help=f"comma-separated subset of {ALL_VARIANTS}")
  parser.add_argument("--batches", action="append", default=None, metavar="SPEC",
                      help="batch sizes overriding the per-model default (repeatable): "
                           "'N[,N...]' for every selected model, or 'MODEL=N[,N...]' "
                           "(several joined by ';'); e.g. small_cnn=512,4096")
  parser.add_argument("--repeats", type=int, default=5, help="timed attacks per variant")
  parser.add_argument("--json", default=None, help="write JSON records to this path")
  parser.add_argument("--pgd-impl", choices=("auto", "torchattacks", "reimpl"), default="auto",
                      help="torchattacks.PGD if importable (auto), or force one")
  add_device_arguments(parser)
  args = parser.parse_args(argv)

  models = [m.strip() for m in args.models.split(",") if m.strip()]
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  for m in models:
    if m not in MODEL_SPECS:
      parser.error(f"unknown model {m!r}; choose from {ALL_MODELS}")
  for v in variants:
    if v not in ALL_VARIANTS:
      parser.error(f"unknown variant {v!r}; choose from {ALL_VARIANTS}")
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  batches = parse_batches(args.batches, models, parser)
  device = setup_device(args, parser)
  info = device_info(device)

  factory, impl_desc = make_attack_factory(args.pgd_impl)
  threads = torch.get_num_threads()
  print(f"torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}, "
        f"threads {threads}, interop threads {torch.get_num_interop_threads()}")
  print(describe_device(info))
  print(f"attack: {impl_desc}; L-inf eps 8/255, step 2/255, {STEPS} steps, random start")
  print(f"models {models}, variants {variants}, repeats {args.repeats}, "
        f"batches {batches}", flush=True)

  records = []
  for model_name in models:
    for batch in batches[model_name]:
      records.extend(run_case(model_name, batch, variants, factory, impl_desc, args, device,
                              info))

  print()
  print(f"torch {torch.__version__}, {threads} threads, {impl_desc}, "
        f"{args.repeats} repeats, {STEPS}-step L-inf PGD")
  print(describe_device(info))
  print()
  print("| model | variant | batch | img*step/s (median) | img*step/s (min) | s/attack (median) |")
  print("|---|---|---:|---:|---:|---:|")
  for r in records:
    if r.get("error") is not None:
      print(f"| {r['model']} | {r['variant']} | {r['batch']} | failed | | {r['error']} |")
      continue
    print(f"| {r['model']} | {r['variant']} | {r['batch']} | "
          f"{r['img_steps_per_second_median']:.1f} | {r['img_steps_per_second_min']:.1f} | "
          f"{statistics.median(r['attack_seconds']):.3f} |")

  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=2)
    print(f"\nwrote {len(records)} records to {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

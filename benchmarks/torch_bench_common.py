"""Helpers shared by the PyTorch reference benchmarks (torch_pgd_reference.py and
torch_train_reference.py): device selection and description, batch-list parsing, and the
interleaved timed repeats with --keep-going failure records. Needs only torch."""
from __future__ import annotations

import platform
import traceback
from typing import Callable

import torch

MATMUL_PRECISIONS = ("highest", "high", "medium")


def add_device_arguments(parser):
  """--device, --float32-matmul-precision and --keep-going."""
  parser.add_argument("--device", default="cpu",
                      help="cpu (default), cuda, cuda:N, or auto (cuda if available, else cpu)")
  parser.add_argument("--float32-matmul-precision", choices=MATMUL_PRECISIONS, default=None,
                      help="torch.set_float32_matmul_precision(...) (default: leave torch's "
                           "default; 'high' allows TF32 matmuls on CUDA)")
  parser.add_argument("--keep-going", action="store_true",
                      help="record a variant that raises (e.g. CUDA OOM) as an error and go on")


def setup_device(args, parser):
  """Resolves and configures --device; returns the torch.device (parser.error if unusable)."""
  name = args.device.strip().lower()
  if name == "auto":
    name = "cuda" if torch.cuda.is_available() else "cpu"
  try:
    device = torch.device(name)
  except RuntimeError as error:
    parser.error(f"--device: {error}")
  if device.type == "cuda":
    if not torch.cuda.is_available():
      parser.error(f"--device {args.device}: CUDA is not available in this torch "
                   f"({torch.__version__})")
    if device.index is not None:
      if device.index >= torch.cuda.device_count():
        parser.error(f"--device {args.device}: only {torch.cuda.device_count()} CUDA devices")
      torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
  elif device.type != "cpu":
    parser.error(f"--device {args.device}: only cpu, cuda, cuda:N and auto are supported")
  if args.float32_matmul_precision is not None:
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
  return device


def synchronize(device):
  """Waits for all queued work on `device` (a no-op on the CPU)."""
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _cpu_name():
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
      for line in handle:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_info(device):
  """Device fields of every JSON record."""
  cuda = device.type == "cuda"
  return {
      "device": str(device),
      "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
      "cuda_version": torch.version.cuda if cuda else None,
      "cudnn_version": torch.backends.cudnn.version() if cuda else None,
      "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
      "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
      "float32_matmul_precision": torch.get_float32_matmul_precision(),
  }


def describe_device(info):
  """One header line for `device_info(...)`."""
  text = f"device {info['device']} ({info['device_name']})"
  if info["cuda_version"] is not None:
    text += (f", CUDA {info['cuda_version']}, cuDNN {info['cudnn_version']}, "
             f"cudnn.benchmark {info['cudnn_benchmark']}, cudnn TF32 {info['cudnn_allow_tf32']}")
  return text + f", float32 matmul precision {info['float32_matmul_precision']}"


def release_memory(device):
  """Frees cached CUDA blocks between cases (a no-op on the CPU)."""
  if device.type == "cuda":
    torch.cuda.empty_cache()


def reset_compiled():
  """Drops torch.compile caches, so nothing compiled (or guessed dynamic) leaks between cases."""
  dynamo = getattr(torch, "_dynamo", None)
  if dynamo is not None and hasattr(dynamo, "reset"):
    dynamo.reset()


def parse_sizes(values, parser, label):
  """'512,4096' -> [512, 4096] (distinct positive integers, in order); errors name `label`."""
  sizes = []
  for value in values.split(","):
    value = value.strip()
    if not value:
      continue
    try:
      size = int(value)
    except ValueError:
      size = 0
    if size < 1:
      parser.error(f"{label}: {value!r} is not a positive integer")
    if size not in sizes:
      sizes.append(size)
  if not sizes:
    parser.error(f"{label}: no batch sizes")
  return sizes


def failure(tag, variant, stage):
  """Called in an `except` block under --keep-going: prints the traceback, returns a summary."""
  error = traceback.format_exc()
  print(f"{tag} {variant}: FAILED in {stage}:\n{error}", flush=True)
  return f"{stage}: {error.strip().splitlines()[-1]}"


def interleaved_seconds(runs: dict[str, Callable[[], float]], repeats, device, keep_going, tag,
                        errors, report=None):
  """{variant: [seconds]} of `repeats` rounds, variants interleaved (A1 B1 C1 A2 ...).

  `runs[variant]()` times one run. A variant that raises is dropped from the later rounds and
  its summary stored in `errors` (only with `keep_going`; else the error propagates).
  `report(variant, round, seconds)` is called after each run.
  """
  runs = dict(runs)
  seconds = {variant: [] for variant in runs}
  for rep in range(repeats):
    for variant in list(runs):
      try:
        elapsed = runs[variant]()
      except Exception:  # Swallowed only under --keep-going.
        if not keep_going:
          raise
        errors[variant] = failure(tag, variant, f"repeat {rep + 1}")
      if variant in errors:
        del runs[variant]
        release_memory(device)  # Outside the except block: the traceback no longer pins memory.
        continue
      seconds[variant].append(elapsed)
      if report is not None:
        report(variant, rep, elapsed)
  return seconds

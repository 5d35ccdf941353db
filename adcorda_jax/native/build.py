"""Builds the native CPU kernels on first use and registers them as XLA FFI targets.

The kernels are a few hundred lines of C++ against the XLA FFI headers that ship with jaxlib
(`jax.ffi.include_dir()`), compiled for the host CPU (`-march=native`, or `$ADCORDA_NATIVE_MARCH`)
by the system C++ compiler (`$CXX`, else c++/g++/clang++) the first time they are needed, in a
few seconds. AVX-512 and AVX2 machines get explicit vector code, others portable vector code.
The shared library is cached under `$ADCORDA_JAX_CACHE` (default `~/.cache/adcorda_jax`), keyed by
the source, the jaxlib version, the compiler, its flags and the CPU, and written atomically, so
concurrent processes and machines sharing a home directory never load a half-written or foreign
library. On first use on a CPU the build also picks the kernel's vector width and register
blocking by measurement (`tune.py`: a few variants compiled and timed, about half a minute once),
cached the same way; `$ADCORDA_NATIVE_VARIANT` names one instead.

Without a compiler (or with `ADCORDA_NATIVE_KERNELS=0`) nothing is built and callers fall back to
XLA's own operations; the reason is logged once.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jaxlib
from absl import logging

from adcorda_jax.native import tune

SOURCE = Path(__file__).with_name("conv2d_cpu.cc")
TARGET = "adcorda_conv2d_cpu"  # FFI target name prefixes: the forward convolution
KERNEL_GRAD_TARGET = "adcorda_conv2d_kernel_grad_cpu"  # and its kernel (weight) gradient;
FUSED_TARGET = "adcorda_conv2d_fused_cpu"  # the forward with input gate and epilogue operands.
# FFI target name prefix -> handler symbol in the library.
HANDLERS = {TARGET: "AdcordaConv2dCpu", KERNEL_GRAD_TARGET: "AdcordaConv2dKernelGradCpu",
            FUSED_TARGET: "AdcordaConv2dFusedCpu"}
DISABLE_ENV = "ADCORDA_NATIVE_KERNELS"
CACHE_ENV = "ADCORDA_JAX_CACHE"
COMPILER_ENV = "CXX"
MARCH_ENV = "ADCORDA_NATIVE_MARCH"  # -march value; default "native" (the host CPU).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
_REGISTERED: set[str] = set()  # FFI targets registered in this process.


class NativeKernel:
  """A loaded kernel library: its path, FFI target names and the vector width it requires.

  `target` is the forward convolution, `kernel_grad_target` its kernel (weight) gradient,
  `fused_target` the forward with a ReLU-gate prologue and bias/residual/ReLU epilogue. The
  names carry the library's cache key, so two builds (another cache folder, a changed source)
  never collide in XLA's handler registry.
  """

  def __init__(self, path: Path, variant: str = ""):
    self.path = path
    self.variant = variant  # The tuned (or forced) kernel variant, see tune.py.
    self.library = ctypes.cdll.LoadLibrary(str(path))
    self.lanes = int(self.library.adcorda_conv2d_cpu_lanes())
    key = path.stem.rsplit('-', 1)[-1]
    self.targets = {f"{prefix}_{key}": symbol for prefix, symbol in HANDLERS.items()}
    self.target, self.kernel_grad_target, self.fused_target = self.targets


def _cpu_signature() -> str:
  """What `-march=native` depends on: the CPU model and its feature flags."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      lines = [line for line in cpuinfo if line.startswith(("flags", "model name", "Features"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
  return shutil.which(os.environ.get(COMPILER_ENV, "")) or shutil.which("c++") or shutil.which(
      "g++") or shutil.which("clang++")


def _cache_dir() -> Path:
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                   "adcorda_jax")
  return Path(root)


def compiler_flags(variant: tune.Variant | None = None) -> tuple[str, ...]:
  """FLAGS plus the target ISA (`-march=native` unless $ADCORDA_NATIVE_MARCH names another)
  and the variant's vector width and blocking."""
  flags = FLAGS + (f"-march={os.environ.get(MARCH_ENV) or 'native'}",)
  return flags + (variant.flags() if variant is not None else ())


def _cache_key(compiler: str, variant: tune.Variant | None) -> str:
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), compiler.encode(),
               " ".join(compiler_flags(variant)).encode(), _cpu_signature().encode()):
    key.update(part)
    key.update(b"\0")
  return key.hexdigest()[:16]


def library_path(compiler: str, variant: tune.Variant | None = None) -> Path:
  """Where the library built by `compiler` for this source, jaxlib, flags, variant and CPU is
  cached."""
  return _cache_dir() / f"conv2d_cpu-{_cache_key(compiler, variant)}.so"


def _cpu_flags() -> str:
  for line in _cpu_signature().splitlines():
    if line.startswith("flags"):
      return line.split(":", 1)[-1]
  return ""


def choose_variant(compiler: str) -> tune.Variant | None:
  """The kernel variant for this CPU: $ADCORDA_NATIVE_VARIANT, the cached measured choice, or a
  fresh measurement of every candidate (then cached); the first candidate if measuring fails.
  None (the source's defaults for the target ISA) when $ADCORDA_NATIVE_MARCH builds for another
  CPU than this one, whose timings would not apply."""
  cpu_flags = _cpu_flags()
  forced = os.environ.get(tune.VARIANT_ENV, "").strip()
  if forced == "default":  # The source's defaults for the ISA, without measuring.
    return None
  if forced:
    return tune.variant_named(forced, cpu_flags)
  if os.environ.get(MARCH_ENV, "native") != "native":
    return None
  options = tune.candidates(cpu_flags)
  if len(options) == 1:
    return options[0]
  record_path = _cache_dir() / f"conv2d_cpu-tuning-{_cache_key(compiler, None)}.json"
  record = tune.read_choice(record_path)
  if record and isinstance(record.get("variant"), str):
    try:
      return tune.variant_named(record["variant"], cpu_flags)
    except ValueError:
      pass  # A record from another release: measure again.
  start = time.perf_counter()
  paths = {variant.name: library_path(compiler, variant) for variant in options}
  try:
    _compile_all(compiler, [(v, paths[v.name]) for v in options])
    chosen, seconds = tune.choose(options, paths)
  except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as error:
    logging.warning("Native kernel tuning failed (%s); using variant %s.", error,
                    options[0].name)
    return options[0]
  cpu = next((line.split(":", 1)[-1].strip() for line in _cpu_signature().splitlines()
              if line.startswith("model name")), platform.machine())
  tune.write_choice(record_path, {"variant": chosen.name, "seconds": seconds, "cpu": cpu,
                                  "shapes": [list(shape) for shape in tune.SHAPES]})
  logging.info("Tuned the native CPU convolution in %.1f s: variant %s.",
               time.perf_counter() - start, chosen.name)
  return chosen


def _compile_all(compiler: str, builds: list[tuple[tune.Variant, Path]]) -> None:
  """Compiles the builds not cached yet, as many at once as there are cores."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    jobs = [pool.submit(compile_library, compiler, path, variant)
            for variant, path in builds if not path.exists()]
    for job in jobs:
      job.result()


def compile_library(compiler: str, destination: Path,
                    variant: tune.Variant | None = None) -> None:
  """Compiles SOURCE into `destination` atomically (temp file in the same folder, then rename)."""
  destination.parent.mkdir(parents=True, exist_ok=True)
  handle, temporary = tempfile.mkstemp(suffix=".so", dir=destination.parent)
  os.close(handle)
  command = [compiler, *compiler_flags(variant), f"-I{jax.ffi.include_dir()}", str(SOURCE),
             "-o", temporary]
  try:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
    os.replace(temporary, destination)
  finally:
    if os.path.exists(temporary):
      os.unlink(temporary)


@functools.lru_cache(maxsize=None)
def conv2d_kernel() -> NativeKernel | None:
  """The registered native convolution, or None (with the reason logged once) if unavailable."""
  if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    logging.info("Native CPU kernels disabled by %s; convolutions use XLA's.", DISABLE_ENV)
    return None
  compiler = _compiler()
  if compiler is None:
    logging.warning("No C++ compiler found (set %s); convolutions use XLA's own kernels, "
                    "which are slower for few channels on CPU.", COMPILER_ENV)
    return None
  try:
    variant = choose_variant(compiler)
    path = library_path(compiler, variant)
    if not path.exists():
      start = time.perf_counter()
      compile_library(compiler, path, variant)
      logging.info("Compiled the native CPU convolution into %s in %.1f s.", path,
                   time.perf_counter() - start)
    kernel = NativeKernel(path, variant.name if variant else "default")
    for target, symbol in kernel.targets.items():
      if target not in _REGISTERED:  # The same key is the same code: register it once.
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(kernel.library, symbol)),
                                    platform="cpu")
        _REGISTERED.add(target)
  except (OSError, RuntimeError, AttributeError, ValueError) as error:
    logging.warning("Native CPU convolution unavailable (%s); using XLA's.", error)
    return None
  logging.info("Native CPU convolution loaded from %s (variant %s, %d-float vectors).", path,
               kernel.variant, kernel.lanes)
  return kernel


def native_variant() -> str | None:
  """The loaded kernel's variant name (for benchmark records), None without a native kernel."""
  kernel = conv2d_kernel() if jax.default_backend() == "cpu" else None
  return kernel.variant if kernel is not None else None

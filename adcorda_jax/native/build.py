"""Builds the native CPU kernels on first use and registers them as XLA FFI targets.

The kernels are a few hundred lines of C++ against the XLA FFI headers that ship with jaxlib
(`jax.ffi.include_dir()`), compiled for the host CPU (`-march=native`, or `$ADCORDA_NATIVE_MARCH`)
by the system C++ compiler (`$CXX`, else c++/g++/clang++) the first time they are needed, in a
few seconds. AVX-512 and AVX2 machines get explicit vector code, others portable vector code.
The shared library is cached under `$ADCORDA_JAX_CACHE` (default `~/.cache/adcorda_jax`), keyed by
the source, the jaxlib version, the compiler, its flags and the CPU, and written atomically, so
concurrent processes and machines sharing a home directory never load a half-written or foreign
library.

Without a compiler (or with `ADCORDA_NATIVE_KERNELS=0`) nothing is built and callers fall back to
XLA's own operations; the reason is logged once.
"""
from __future__ import annotations

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

SOURCE = Path(__file__).with_name("conv2d_cpu.cc")
TARGET = "adcorda_conv2d_cpu"  # FFI target name prefixes: the forward convolution
KERNEL_GRAD_TARGET = "adcorda_conv2d_kernel_grad_cpu"  # and its kernel (weight) gradient.
# FFI target name prefix -> handler symbol in the library.
HANDLERS = {TARGET: "AdcordaConv2dCpu", KERNEL_GRAD_TARGET: "AdcordaConv2dKernelGradCpu"}
DISABLE_ENV = "ADCORDA_NATIVE_KERNELS"
CACHE_ENV = "ADCORDA_JAX_CACHE"
COMPILER_ENV = "CXX"
MARCH_ENV = "ADCORDA_NATIVE_MARCH"  # -march value; default "native" (the host CPU).
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
_REGISTERED: set[str] = set()  # FFI targets registered in this process.


class NativeKernel:
  """A loaded kernel library: its path, FFI target names and the vector width it requires.

  `target` is the forward convolution, `kernel_grad_target` its kernel (weight) gradient. The
  names carry the library's cache key, so two builds (another cache folder, a changed source)
  never collide in XLA's handler registry.
  """

  def __init__(self, path: Path):
    self.path = path
    self.library = ctypes.cdll.LoadLibrary(str(path))
    self.lanes = int(self.library.adcorda_conv2d_cpu_lanes())
    key = path.stem.rsplit('-', 1)[-1]
    self.targets = {f"{prefix}_{key}": symbol for prefix, symbol in HANDLERS.items()}
    self.target, self.kernel_grad_target = self.targets


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


def compiler_flags() -> tuple[str, ...]:
  """FLAGS plus the target ISA: `-march=native` unless $ADCORDA_NATIVE_MARCH names another."""
  return FLAGS + (f"-march={os.environ.get(MARCH_ENV) or 'native'}",)


def library_path(compiler: str) -> Path:
  """Where the library built by `compiler` for this source, jaxlib, flags and CPU is cached."""
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jaxlib.__version__.encode(), compiler.encode(),
               " ".join(compiler_flags()).encode(), _cpu_signature().encode()):
    key.update(part)
    key.update(b"\0")
  return _cache_dir() / f"conv2d_cpu-{key.hexdigest()[:16]}.so"


def compile_library(compiler: str, destination: Path) -> None:
  """Compiles SOURCE into `destination` atomically (temp file in the same folder, then rename)."""
  destination.parent.mkdir(parents=True, exist_ok=True)
  handle, temporary = tempfile.mkstemp(suffix=".so", dir=destination.parent)
  os.close(handle)
  command = [compiler, *compiler_flags(), f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o",
             temporary]
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
  path = library_path(compiler)
  try:
    if not path.exists():
      start = time.perf_counter()
      compile_library(compiler, path)
      logging.info("Compiled the native CPU convolution into %s in %.1f s.", path,
                   time.perf_counter() - start)
    kernel = NativeKernel(path)
    for target, symbol in kernel.targets.items():
      if target not in _REGISTERED:  # The same key is the same code: register it once.
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(kernel.library, symbol)),
                                    platform="cpu")
        _REGISTERED.add(target)
  except (OSError, RuntimeError, AttributeError, ValueError) as error:
    logging.warning("Native CPU convolution unavailable (%s); using XLA's.", error)
    return None
  logging.info("Native CPU convolution loaded from %s (%d-float vectors).", path, kernel.lanes)
  return kernel

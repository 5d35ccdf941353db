"""Per-CPU choice of the native convolution's vector width and register blocking.

The kernel's best block sizes differ between CPUs: full-width AVX-512 (Intel, Zen 5), AVX-512
run at half width (Zen 4) and AVX2 have different FMA throughput and register files. The build
compiles the variants of `candidates()` for the host (`-D` overrides of the kernel's defaults),
times each on a few convolution shapes of the project's models in a subprocess (timings must not
be staged into a caller's trace, and a broken variant must not take the process down), keeps the
fastest, and caches the choice beside the libraries, keyed like them (source, jaxlib, compiler,
flags, CPU). `$ADCORDA_NATIVE_VARIANT` names a variant (or `default`: the source's defaults for
the instruction set) and skips the measurement.

Run as `python -m adcorda_jax.native.tune LIB...` it prints each library's seconds as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from absl import logging

VARIANT_ENV = "ADCORDA_NATIVE_VARIANT"
# Forward convolution shapes timed per variant: (batch, size, channels in, channels out, stride),
# 3x3 kernels, padding 1, and the block size each one decides (see conv2d_cpu.cc): 16 output
# channels run the one-vector tap path (AVX-512), 32 and 64 the two-vector one, strided layers
# the general path. ResNet-20's stages and strided entry and the small CNN's first block.
SHAPES = ((64, 32, 16, 16, 1), (64, 16, 32, 32, 1), (64, 8, 64, 64, 1), (64, 32, 16, 32, 2),
          (64, 28, 32, 32, 1))
DECIDES = ("tap_pixels1", "tap_pixels2", "tap_pixels2", "pixels", "tap_pixels2")
ROUNDS = 7  # Timed rounds per shape; each times CALLS calls of every library in turn.
CALLS = 4
_PREFIX = {512: "zmm", 256: "ymm", 128: "xmm"}
_NAME = re.compile(r"^(zmm|ymm|xmm)-t(\d+)x(\d+)-p(\d+)$")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One build of the kernel: vector width and register blocking (see conv2d_cpu.cc)."""
  vector_bits: int
  pixels: int         # general path (strided layers), 2 vectors of output channels
  tap_pixels1: int    # stride-1 tap path, 1 vector
  tap_pixels2: int    # stride-1 tap path, 2 vectors
  registers: int = 32

  @property
  def name(self) -> str:
    return (f"{_PREFIX[self.vector_bits]}-t{self.tap_pixels1}x{self.tap_pixels2}"
            f"-p{self.pixels}")

  def grad_rows(self) -> tuple[int, int]:
    return (16, 12) if self.registers == 32 else (8, 6)

  def flags(self) -> tuple[str, ...]:
    blocking = (self.pixels, self.tap_pixels1, self.tap_pixels2) + self.grad_rows()
    return (f"-DADCORDA_VECTOR_BITS={self.vector_bits}",
            "-DADCORDA_BLOCKING=" + ",".join(str(value) for value in blocking))


def candidates(cpu_flags: str) -> tuple[Variant, ...]:
  """The builds measured on a CPU with these /proc/cpuinfo flags (the first is the default).

  Full-width vectors at three register blockings (the largest fill the register file), and for
  AVX-512 also 256-bit vectors with its 32 registers (what half-width AVX-512 may prefer)."""
  flags = set(cpu_flags.split())
  if "avx512f" in flags:
    return (Variant(512, 8, 12, 8), Variant(512, 6, 16, 10), Variant(512, 10, 24, 12),
            Variant(256, 8, 16, 10))
  if "avx2" in flags and "fma" in flags:
    registers = 32 if "avx512vl" in flags else 16
    return (Variant(256, 4, 8, 4, registers), Variant(256, 3, 12, 4, registers),
            Variant(256, 4, 6, 3, registers))
  return (Variant(128, 4, 8, 4, 16),)


def variant_named(name: str, cpu_flags: str) -> Variant:
  """The variant called `name`, e.g. 'zmm-t16x10-p6' (one-line error if malformed)."""
  match = _NAME.match(name)
  default = candidates(cpu_flags)[0]
  if not match:
    raise ValueError(f"{VARIANT_ENV}={name!r} is not a kernel variant name like "
                     f"{default.name!r} (vectors-t<tap pixels 1>x<tap pixels 2>-p<pixels>)")
  bits = {prefix: bits for bits, prefix in _PREFIX.items()}[match.group(1)]
  tap1, tap2, pixels = (int(match.group(i)) for i in (2, 3, 4))
  return Variant(bits, pixels, tap1, tap2, default.registers)


def compose(seconds: dict[str, list[float]], variants: Sequence[Variant]) -> Variant:
  """The vector width with the fastest build, and for it each block size from the build that
  ran the shapes it decides fastest (block sizes of different paths do not interact)."""
  best = min(variants, key=lambda v: sum(seconds[v.name]))
  same_width = [v for v in variants if v.vector_bits == best.vector_bits]
  chosen = {}
  for field in ("pixels", "tap_pixels1", "tap_pixels2"):
    rows = [i for i, decides in enumerate(DECIDES) if decides == field]
    fastest = min(same_width, key=lambda v: sum(seconds[v.name][i] for i in rows))
    chosen[field] = getattr(fastest, field)
  return dataclasses.replace(best, **chosen)


def measure(libraries: Sequence[Path]) -> dict[str, list[float]]:
  """Seconds per library and shape (best of ROUNDS), measured in a subprocess."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "adcorda_jax.native.tune", *map(str, libraries)]
  result = subprocess.run(command, capture_output=True, text=True, env=env, check=False,
                          timeout=600)
  if result.returncode != 0:
    raise RuntimeError(f"kernel tuning failed: {result.stderr.strip()[-1000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def read_choice(path: Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def write_choice(path: Path, choice: dict) -> None:
  """Writes the tuning record atomically (temp file in the same folder, then rename).

  Not `workdir.write_json_atomic`: that writes from process 0 only, and this cache belongs to
  the machine, not to one job (another host's processes must record their own choice)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  handle, temporary = tempfile.mkstemp(suffix=".json", dir=path.parent)
  try:
    with os.fdopen(handle, "w") as stream:
      json.dump(choice, stream, indent=1)
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.unlink(temporary)


def _time_libraries(paths: Sequence[str]) -> dict[str, list[float]]:
  """Seconds of each of SHAPES per library (runs in the tuning subprocess): the libraries take
  turns on every shape in every round, so a change in the machine's speed hits all alike."""
  import ctypes  # pylint: disable=import-outside-toplevel

  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  targets = {}
  for index, path in enumerate(paths):
    library = ctypes.cdll.LoadLibrary(path)
    targets[path] = f"adcorda_tune_{index}_{Path(path).stem.replace('-', '_')}"
    jax.ffi.register_ffi_target(targets[path], jax.ffi.pycapsule(library.AdcordaConv2dCpu),
                                platform="cpu")
  seconds = {path: [] for path in paths}
  for batch, size, c_in, c_out, stride in SHAPES:
    out = (size + 2 - 3) // stride + 1
    x = jnp.ones((batch, size, size, c_in), jnp.float32)
    kernel = jnp.ones((3, 3, c_in, c_out), jnp.float32)
    programs = {}
    for path in paths:
      call = jax.ffi.ffi_call(targets[path],
                              jax.ShapeDtypeStruct((batch, out, out, c_out), jnp.float32))
      programs[path] = jax.jit(lambda x, k, call=call, stride=stride: call(
          x, k, stride_h=np.int64(stride), stride_w=np.int64(stride), pad_top=np.int64(1),
          pad_bottom=np.int64(1), pad_left=np.int64(1), pad_right=np.int64(1)))
      programs[path](x, kernel).block_until_ready()
    best = {path: float("inf") for path in paths}
    for _ in range(ROUNDS):
      for path, program in programs.items():
        start = time.perf_counter()
        for _ in range(CALLS):
          y = program(x, kernel)
        y.block_until_ready()
        best[path] = min(best[path], (time.perf_counter() - start) / CALLS)
    for path in paths:
      seconds[path].append(best[path])
  return seconds


def choose(variants: Sequence[Variant],
           libraries: dict[str, Path]) -> tuple[Variant, dict[str, list[float]]]:
  """(the composed variant, seconds per build and shape: the best of two measurements)."""
  seconds = {v.name: [float("inf")] * len(SHAPES) for v in variants}
  for _ in range(2):
    timings = measure([libraries[v.name] for v in variants])
    for v in variants:
      seconds[v.name] = [min(a, b) for a, b in zip(seconds[v.name],
                                                   timings[str(libraries[v.name])])]
  chosen = compose(seconds, variants)
  logging.info("Native kernel variants (seconds): %s; chose %s.",
               ", ".join(f"{v.name} {sum(seconds[v.name]):.4f}" for v in variants),
               chosen.name)
  return chosen, seconds


if __name__ == "__main__":
  print(json.dumps(_time_libraries(sys.argv[1:])))

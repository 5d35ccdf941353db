"""`jax.jit` for attack programs, with per-backend XLA compiler options chosen per program.

When the convolutions of an attack program run on XLA:CPU's own kernels (no native kernel, see
`adcorda_jax.native`), it compiles with YNNPACK fusions off
(`xla_cpu_experimental_ynn_fusion_type=""`): YNNPACK's convolution fusions run this workload
markedly slower than XLA's own convolutions (see `task=benchmark_attack`). With the native
convolution kernel YNNPACK never sees a convolution, and XLA's defaults were measured 1-7% faster,
so they are kept. The option is passed to each attack program's compilation only; global XLA
flags and every other program are untouched, and it is logged once. It is skipped when
`XLA_FLAGS` already sets the option, and `ADCORDA_ATTACK_COMPILER_OPTIONS=xla_default` turns it
off.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable

import jax
from absl import logging

from adcorda_jax.native import conv2d as native_conv

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
OVERRIDE_ENV = "ADCORDA_ATTACK_COMPILER_OPTIONS"


def compiler_options(backend: str,
                     native_convolutions: bool | None = None) -> tuple[tuple[str, Any], ...]:
  """The options attack programs compile with on `backend`, as a hashable tuple.

  `native_convolutions`: whether the program's convolutions run on the native CPU kernel;
  None means "whenever it is available", which is what `attack_model` gives every attack.
  """
  if native_convolutions is None:
    native_convolutions = backend == "cpu" and native_conv.available()
  return _options(backend, bool(native_convolutions))


@functools.lru_cache(maxsize=None)
def _options(backend: str, native_convolutions: bool) -> tuple[tuple[str, Any], ...]:
  if (backend != "cpu" or native_convolutions
      or os.environ.get(OVERRIDE_ENV, "") == "xla_default"):
    return ()
  flags = os.environ.get("XLA_FLAGS", "")
  options = tuple((k, v) for k, v in CPU_OPTIONS.items() if k not in flags)
  if options:
    logging.info("Attack programs on XLA:CPU compile with %s (per program; global XLA flags "
                 "untouched; %s=xla_default keeps XLA's defaults).",
                 ", ".join(f"{k}={v!r}" for k, v in options), OVERRIDE_ENV)
  return options


def attack_jit(*, static_argnums: int | Iterable[int] | None = None,
               static_argnames: str | Iterable[str] | None = None) -> Callable:
  """Decorator: `jax.jit` whose compiler options are picked for the backend at first call.

  The wrapped function keeps `jax.jit`'s call, `.lower` and `.trace`; when it is called inside
  another attack program it is inlined and the outer program's options apply.
  """
  def decorate(fun: Callable) -> Callable:
    @functools.lru_cache(maxsize=None)
    def jitted(backend: str | None):
      options = dict(compiler_options(backend)) if backend else {}
      return jax.jit(fun, static_argnums=static_argnums, static_argnames=static_argnames,
                     compiler_options=options or None)

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
      # Inside another trace (vmap, an outer jit) options are the outer program's business.
      nested = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
      return jitted(None if nested else jax.default_backend())(*args, **kwargs)

    wrapper.lower = lambda *a, **k: jitted(jax.default_backend()).lower(*a, **k)
    wrapper.trace = lambda *a, **k: jitted(jax.default_backend()).trace(*a, **k)
    return wrapper

  return decorate

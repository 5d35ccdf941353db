"""Routes a flax model's plain convolutions through `fast_conv.conv2d`, for any apply call.

XLA:CPU differentiates convolutions with slow generic kernels (transposed and weight-gradient
convolutions), and its forward kernel is slow for few channels. `fast_convolutions()` is a
context manager: every plain 2-D `nn.Conv` called inside it (while a function is traced) runs
through `fast_conv.conv2d` instead: forward, input gradient and kernel gradient on the native
CPU kernel (`adcorda_jax.native`) where it could be built, else on XLA's canonical forward
convolutions. It is a flax method interceptor, so models are not rewritten; convolutions outside
the fast path (grouped, dilated, masked, non-float32, circular padding) keep flax's code.

Training steps (`training.steps.train_step`, fine-tuning, distillation), evaluation and
prediction passes and the attacks' frozen models all enter it with setting "auto": on the
backends in `FAST_CONV_BACKENDS` (the CPU) only. GPU and TPU keep the plain path.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from adcorda_jax.models.fast_conv import conv2d

FastPath = bool | Literal["auto"]
# Backends on which the custom convolution VJP and the native kernels were measured faster.
FAST_CONV_BACKENDS = ("cpu",)


def use_fast_convolutions(setting: FastPath, backend: str | None = None) -> bool:
  """Resolves `setting`: 'auto' enables the fast path on the backends where it wins."""
  if setting == "auto":
    return (backend or jax.default_backend()) in FAST_CONV_BACKENDS
  if not isinstance(setting, bool):
    raise ValueError(f"fast convolution setting must be True, False or 'auto', got {setting!r}")
  return setting


def _as_pair(value: Any, default: int = 1) -> tuple[int, ...] | None:
  if value is None:
    return (default, default)
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  return value if len(value) == 2 and all(isinstance(v, int) for v in value) else None


def _explicit_padding(padding: Any, x_shape, kernel_shape, strides):
  """Flax padding spec as ((lo, hi), (lo, hi)), or None when the fast path cannot take it."""
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      return None
    pads = lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], strides, padding.upper())
    return tuple((int(lo), int(hi)) for lo, hi in pads)
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pairs = []
  for pair in padding:
    if isinstance(pair, int):
      pairs.append((pair, pair))
    elif len(pair) == 2:
      pairs.append((int(pair[0]), int(pair[1])))
    else:
      return None
  return tuple(pairs) if len(pairs) == 2 else None


def _fast_conv_call(module: nn.Conv, x: jax.Array, native: bool) -> jax.Array | None:
  """`module(x)` through `conv2d`, or None when this conv is outside the fast path."""
  kernel = module.get_variable("params", "kernel")
  strides = _as_pair(module.strides)
  plain = (
      kernel is not None and x.ndim == 4 and kernel.ndim == 4 and strides is not None
      and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
      and module.dtype in (None, jnp.float32) and module.feature_group_count == 1
      and _as_pair(module.input_dilation) == (1, 1)
      and _as_pair(module.kernel_dilation) == (1, 1)
      and module.mask is None and module.shared_weights and module.precision is None
      and module.conv_general_dilated is None and module.conv_general_dilated_cls is None)
  if not plain:
    return None
  padding = _explicit_padding(module.padding, x.shape, kernel.shape, strides)
  if padding is None:
    return None
  y = conv2d(x, kernel, strides, padding, native)
  if module.use_bias:
    y = y + module.get_variable("params", "bias")
  return y


def _interceptor(native: bool):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (type(module) is nn.Conv and context.method_name == "__call__" and len(args) == 1
        and not kwargs):
      y = _fast_conv_call(module, args[0], native)
      if y is not None:
        return y
    return next_fun(*args, **kwargs)
  return intercept


_INTERCEPTORS = {native: _interceptor(native) for native in (True, False)}


@contextlib.contextmanager
def fast_convolutions(setting: FastPath = "auto", native_kernels: bool = True,
                      backend: str | None = None) -> Iterator[bool]:
  """Inside, plain convolutions of flax modules run through `fast_conv.conv2d`.

  `setting` "auto" enables it on `backend` (default: JAX's default backend) when that is one of
  `FAST_CONV_BACKENDS`; `native_kernels` lets `conv2d` use the native CPU kernel. Yields whether
  the fast path is on. Values and gradients equal the plain model's to float tolerance.
  """
  if not use_fast_convolutions(setting, backend):
    yield False
    return
  with nn.intercept_methods(_INTERCEPTORS[bool(native_kernels)]):
    yield True

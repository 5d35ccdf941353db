"""Eval-mode apply functions for frozen models, with the fast input-gradient path on CPU.

Attacks and robustness evaluation differentiate a frozen network (running BatchNorm statistics)
with respect to its input. `frozen_logits_fn` wraps `model.apply(..., train=False)` and, where it
is faster, routes every plain 2-D `nn.Conv` through `fast_conv.conv2d` (and from there to the
native CPU convolution kernel, when it could be built) with a flax method interceptor: the models
themselves are not rewritten, and convolutions the fast path does not cover (grouped, dilated,
masked, non-float32, circular padding) keep flax's implementation.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from adcorda_jax.models.fast_conv import conv2d

FastPath = bool | Literal["auto"]
# Backends on which the custom input gradient was measured faster than autodiff's.
FAST_INPUT_GRADIENT_BACKENDS = ("cpu",)


def use_fast_input_gradients(setting: FastPath, backend: str | None = None) -> bool:
  """Resolves `setting`: 'auto' enables the fast path on the backends where it wins."""
  if setting == "auto":
    return (backend or jax.default_backend()) in FAST_INPUT_GRADIENT_BACKENDS
  return bool(setting)


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


def _fast_conv_interceptor(next_fun, args, kwargs, context, *, native: bool):
  module = context.module
  if type(module) is nn.Conv and context.method_name == "__call__" and len(args) == 1:
    y = _fast_conv_call(module, args[0], native)
    if y is not None:
      return y
  return next_fun(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def frozen_logits_fn(model: nn.Module, fast_input_gradients: bool,
                     native_kernels: bool = True) -> Callable[..., jax.Array]:
  """`logits_fn(variables, x)`: the model in eval mode, one function object per setting.

  With `fast_input_gradients`, plain convolutions use `fast_conv.conv2d`, whose input gradient
  is computed with forward convolutions only; with `native_kernels` too, those run on the native
  CPU kernel when it is available (`adcorda_jax.native`). Values and gradients equal the plain
  model's (float tolerance).
  """
  interceptor = functools.partial(_fast_conv_interceptor, native=native_kernels)

  def logits_fn(variables: Any, x: jax.Array) -> jax.Array:
    if not fast_input_gradients:
      return model.apply(variables, x, train=False)
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, train=False)

  return logits_fn

"""Eval-mode apply functions for frozen models, with the fast input-gradient path on CPU.

Attacks and robustness evaluation differentiate a frozen network (running BatchNorm statistics)
with respect to its input. `frozen_logits_fn` wraps `model.apply(..., train=False)` and, where it
is faster, routes every plain 2-D `nn.Conv` through `fast_conv.conv2d` (and from there to the
native CPU convolution kernel, when it could be built) with `fast_path.fast_convolutions` (a flax
method interceptor): the models themselves are not rewritten, and convolutions the fast path
does not cover (grouped, dilated, masked, non-float32, circular padding) keep flax's code.
With `fuse_layers` (the default on the fast path) the eval-mode forward is also rewritten so
that every conv -> BatchNorm -> ReLU [-> residual add -> ReLU] chain runs as one native
convolution with its BatchNorm folded in and a fused epilogue (`models.fused_frozen`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax

from adcorda_jax.models.fast_path import (FAST_CONV_BACKENDS, fast_convolutions,
                                          use_fast_convolutions)
from adcorda_jax.models.fused_frozen import fused_logits_fn

# The attack-era names of the fast-path setting.
FAST_INPUT_GRADIENT_BACKENDS = FAST_CONV_BACKENDS
use_fast_input_gradients = use_fast_convolutions


@functools.lru_cache(maxsize=None)
def frozen_logits_fn(model: nn.Module, fast_input_gradients: bool,
                     native_kernels: bool = True,
                     fuse_layers: bool = True) -> Callable[..., jax.Array]:
  """`logits_fn(variables, x)`: the model in eval mode, one function object per setting.

  With `fast_input_gradients`, plain convolutions use `fast_conv.conv2d`, whose input gradient
  is computed with forward convolutions only; with `native_kernels` too, those run on the native
  CPU kernel when it is available (`adcorda_jax.native`). Values and gradients equal the plain
  model's (float tolerance). `fuse_layers` (with `fast_input_gradients` only): fold BatchNorm
  into the convolutions and fuse bias, residual and ReLU into them (`fused_frozen`).
  """
  if fast_input_gradients and fuse_layers:
    return fused_logits_fn(model, bool(native_kernels))

  def logits_fn(variables: Any, x: jax.Array) -> jax.Array:
    with fast_convolutions(bool(fast_input_gradients), native_kernels):
      return model.apply(variables, x, train=False)

  return logits_fn

"""Turning a trained flax model into the `logits_fn(params, x)` every attack takes.

Attacks treat the model as frozen (eval mode, running BatchNorm statistics). `attack_model`
returns a logits function plus the pytree it takes, and is the one place where the attack-time
model is built, so every attack and task gets the same implementation: on CPU, the eval-mode
forward rewritten so that each conv -> BatchNorm -> ReLU [-> residual add -> ReLU] chain is one
native convolution with BatchNorm folded into its kernel and bias, ReLU and residual in its
epilogue and the ReLU mask in its input-gradient convolution (`adcorda_jax.models.fused_frozen`);
the plain model elsewhere.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from adcorda_jax.attacks.losses import LogitsFn
from adcorda_jax.models.fast_path import FastPath, use_fast_convolutions
from adcorda_jax.models.frozen import frozen_logits_fn


def attack_model(model: nn.Module, variables: Any,
                 fast_input_gradients: FastPath = "auto",
                 backend: str | None = None) -> tuple[LogitsFn, Any]:
  """(logits_fn, attack_params) for attacking `model` with `variables` in eval mode.

  `fast_input_gradients`: True, False, or 'auto' (on where measured faster: XLA:CPU). Pass
  `attack_params` (not `variables`) as the attacks' `params` argument. The same function object
  comes back for the same model and setting, so compiled attacks are reused. `backend` is the
  platform the attacks will run on ('auto' resolves against it; default: JAX's default
  backend): pass 'cuda' or 'tpu' to lower an attack for that platform with `jax.export`.
  """
  fast = use_fast_convolutions(fast_input_gradients, backend)
  return frozen_logits_fn(model, fast), variables

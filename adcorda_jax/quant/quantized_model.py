"""Running a float model quantized, without rewriting it: fake-quantized kernels and layer inputs.

* Weights: `fake_quantize_params` replaces every kernel by its quantize-dequantize image before
  `model.apply`. The straight-through estimator passes gradients to the float kernels, so
  quantization-aware training and attacks on the quantized network need no special code.
* Activations: a flax method interceptor fake-quantizes the input of every nn.Conv / nn.Dense
  call with the ranges from `calibration.calibrate_activations` (keyed by module path).
* `fold_batch_norm` merges each BatchNorm into the conv before it, so the quantized kernels are
  the ones an integer inference engine would run.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adcorda_jax.quant.calibration import QUANTIZED_LAYERS, module_path
from adcorda_jax.quant.fake_quant import (QuantSpec, ScaleZeroPoint, compute_scale, fake_quantize,
                                          is_kernel, path_string, quant_range)

# Must match `models.common.batch_norm`; folding is exact only for this epsilon.
BN_EPSILON = 1e-5
# A BatchNorm named `<prefix>bn<digits>` follows the conv `<prefix>conv<digits>` in the same
# parent: conv1 -> bn1, shortcut_conv -> shortcut_bn.
_BN_NAME = re.compile(r"^(.*)bn(\d*)$")

ApplyFn = Callable[..., Any]


def fake_quantize_params(params: Any, weight_scales: Mapping[str, ScaleZeroPoint] | None,
                         spec: QuantSpec | None) -> Any:
  """`params` with every kernel (ndim >= 2) fake-quantized; everything else unchanged.

  `weight_scales` maps kernel paths (see `calibration.calibrate_weights`) to their grids. When it
  is None the grids are min-max scales of the current kernels, held constant for the gradient
  (stop_gradient): what quantization-aware training uses, as the weights move every step.
  `spec` None returns `params` as they are (float model).
  """
  if spec is None:
    return params
  qmin, qmax = quant_range(spec.bits, spec.symmetric)

  def quantize_leaf(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
    if not is_kernel(path, leaf):
      return leaf
    if weight_scales is None:
      scale, zero_point = jax.lax.stop_gradient(compute_scale(leaf, spec))
    else:
      key = path_string(path)
      if key not in weight_scales:
        raise ValueError(f"no weight scale for kernel {key!r}; calibrate_weights covers every "
                         f"kernel of the params it is given")
      scale, zero_point = weight_scales[key]
    kernel = jnp.asarray(leaf, jnp.float32)
    return fake_quantize(kernel, scale, zero_point, qmin, qmax).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(quantize_leaf, params)


def _activation_interceptor(activation_scales: Mapping[str, ScaleZeroPoint],
                            activation_spec: QuantSpec):
  """Interceptor fake-quantizing the first argument of every Conv/Dense `__call__`."""
  qmin, qmax = quant_range(activation_spec.bits, activation_spec.symmetric)

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, QUANTIZED_LAYERS) \
        and args:
      path = module_path(context.module)
      if path not in activation_scales:
        raise ValueError(f"no activation scale for layer {path!r}; run calibrate_activations "
                         f"on this model")
      scale, zero_point = activation_scales[path]
      x = fake_quantize(jnp.asarray(args[0], jnp.float32), scale, zero_point, qmin, qmax)
      args = (x.astype(args[0].dtype),) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  return interceptor


def quantized_apply_fn(model: nn.Module, spec: QuantSpec | None,
                       weight_scales: Mapping[str, ScaleZeroPoint] | None = None,
                       activation_scales: Mapping[str, ScaleZeroPoint] | None = None,
                       activation_spec: QuantSpec | None = None) -> ApplyFn:
  """`apply(variables, x, **kwargs)`: `model.apply` with quantized kernels (and layer inputs).

  Same arguments and return value as `model.apply` (train=True, mutable=['batch_stats'],
  return_features=True, rngs all pass through). Kernels use `weight_scales`, or min-max scales
  of the current weights when None (QAT); `spec` None keeps float kernels. Layer inputs are
  fake-quantized only when `activation_scales` is given, on the grid of `activation_spec` (the
  spec they were calibrated with, required with them). Gradients reach the float params.
  """
  if (activation_scales is None) != (activation_spec is None):
    raise ValueError("activation_scales and activation_spec must be given together")
  interceptor = (None if activation_scales is None
                 else _activation_interceptor(activation_scales, activation_spec))

  def apply(variables: Any, x: jax.Array, *args: Any, **kwargs: Any) -> Any:
    variables = {**variables,
                 "params": fake_quantize_params(variables["params"], weight_scales, spec)}
    if interceptor is None:
      return model.apply(variables, x, *args, **kwargs)
    with nn.intercept_methods(interceptor):
      return model.apply(variables, x, *args, **kwargs)

  return apply


def quantized_logits_fn(model: nn.Module, spec: QuantSpec | None,
                        weight_scales: Mapping[str, ScaleZeroPoint] | None = None,
                        activation_scales: Mapping[str, ScaleZeroPoint] | None = None,
                        straight_through: bool = True,
                        activation_spec: QuantSpec | None = None) -> Callable[..., jax.Array]:
  """`logits_fn(variables, x)`: the quantized model in eval mode, for attacks and evaluation.

  With `straight_through` the input gradient is the quantized network's own, with the STE through
  every activation quantizer (zero where an input was clipped). Otherwise it is BPDA (Athalye et
  al. 2018): the forward value is exactly the quantized model's, but the gradients (w.r.t. x and
  the variables) are those of the float model on the same variables, so an attack is not misled
  by the quantizers' flat or clipped regions. That costs one extra float forward pass.
  """
  apply = quantized_apply_fn(model, spec, weight_scales, activation_scales, activation_spec)

  def quantized_logits(variables: Any, x: jax.Array) -> jax.Array:
    return apply(variables, x, train=False)

  if straight_through:
    return quantized_logits

  def float_logits(variables: Any, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False)

  @jax.custom_vjp
  def bpda_logits(variables: Any, x: jax.Array) -> jax.Array:
    return quantized_logits(variables, x)

  def bpda_fwd(variables, x):
    _, float_vjp = jax.vjp(float_logits, variables, x)  # A pytree (jax Partial): a valid residual.
    return quantized_logits(variables, x), float_vjp

  def bpda_bwd(float_vjp, g):
    return float_vjp(g)

  bpda_logits.defvjp(bpda_fwd, bpda_bwd)
  return bpda_logits


def _bn_conv_name(name: str) -> str | None:
  match = _BN_NAME.match(name)
  return f"{match[1]}conv{match[2]}" if match else None


def _is_batch_norm(params: Any, stats: Any) -> bool:
  return (isinstance(params, Mapping) and set(params) == {"scale", "bias"}
          and isinstance(stats, Mapping) and set(stats) == {"mean", "var"})


def _fold_pair(params: dict, stats: dict, conv: str, bn: str) -> None:
  """Folds `params[bn]` into `params[conv]` in place; `bn` becomes identity plus bias."""
  gamma, beta = params[bn]["scale"], params[bn]["bias"]
  mean, var = stats[bn]["mean"], stats[bn]["var"]
  multiplier = jax.lax.rsqrt(var + BN_EPSILON) * gamma  # What flax's BatchNorm multiplies by.
  kernel = params[conv]["kernel"]
  params[conv]["kernel"] = (kernel * multiplier).astype(kernel.dtype)
  conv_bias = params[conv].get("bias")
  if conv_bias is not None:
    mean = mean - conv_bias
    params[conv]["bias"] = jnp.zeros_like(conv_bias)
  params[bn] = {"scale": jnp.ones_like(gamma), "bias": beta - mean * multiplier}
  # var + eps == 1 exactly in float32, so the BN computes (y - 0) * 1 * 1 + bias.
  one_minus_eps = np.float32(1.0) - np.float32(BN_EPSILON)
  stats[bn] = {"mean": jnp.zeros_like(mean), "var": jnp.full_like(var, one_minus_eps)}


def _fold_scope(params: dict, stats: dict) -> int:
  """Folds every conv/BN pair in this scope and below (in place); returns how many."""
  folded = 0
  for name in list(params):
    child, child_stats = params[name], stats.get(name)
    conv = _bn_conv_name(name)
    if _is_batch_norm(child, child_stats):
      if isinstance(params.get(conv), dict) and np.ndim(params[conv].get("kernel")) == 4:
        _fold_pair(params, stats, conv, name)
        folded += 1
    elif isinstance(child, dict) and isinstance(child_stats, dict):
      folded += _fold_scope(child, child_stats)
  return folded


def fold_batch_norm(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Variables with every BatchNorm folded into the conv before it, for the unchanged model.

  Each kernel is scaled per output channel by gamma / sqrt(var + eps) and its BN becomes an exact
  identity plus bias (scale 1, mean 0, var 1 - eps, bias beta - mean * gamma / sqrt(var + eps)),
  so the same model gives the same eval-mode outputs (float rounding aside). Pairs are found by
  name in the same parent (convK -> bnK, shortcut_conv -> shortcut_bn); BNs without a conv
  partner are left alone. Fold before calibrating weights, and only for inference: with
  train=True the folded BNs would renormalize with batch statistics.
  """
  params = flax.core.unfreeze(variables["params"])
  stats = flax.core.unfreeze(variables.get("batch_stats", {}))
  _fold_scope(params, stats)
  return {**variables, "params": params, "batch_stats": stats}

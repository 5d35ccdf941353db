"""A graph rewrite of a frozen network's eval-mode forward: conv -> BatchNorm -> ReLU fusion.

In eval mode BatchNorm is a per-channel affine map, so it folds exactly into the preceding
convolution's kernel and a bias: `bn(conv(x, k)) = conv(x, k * a) + b`. What follows it (a ReLU;
a residual add and a ReLU) is elementwise, and XLA:CPU would run each as a separate pass over
memory around the native convolutions. `fused_logits_fn` traces `model.apply(..., train=False)`
to a jaxpr, finds the chains

    conv -> per-channel affine ops (BatchNorm, or any add/sub/mul/div by per-channel constants)
         -> [ReLU] | [add of another activation (a residual) -> [ReLU]]

and evaluates the program with each chain replaced by one `fast_conv.conv2d_bias_act` (the
native kernel with bias, residual and ReLU in its epilogue, and the ReLU mask fused into its
input-gradient convolution). Every other operation, and every convolution outside the fast
path's cases (grouped, dilated, non-NHWC, non-float32), is evaluated unchanged, so models are
not rewritten and anything outside the patterns keeps today's path. "Per-channel constant"
means a value that does not depend on the image input and is constant over batch and space, so
train-mode BatchNorm (batch statistics) is never folded.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from adcorda_jax.models import fast_conv

_AFFINE = ("add", "sub", "mul", "div")


@dataclasses.dataclass
class _Affine:
  """One per-channel op of a chain: `op` with the constant `operand`; `constant_first` for
  c - v and c / v (the latter is not affine and never matched)."""
  op: str
  operand: Any
  constant_first: bool


@dataclasses.dataclass
class _Chain:
  """A matched conv -> affine* -> [residual add] -> [ReLU] chain, emitted at its last eqn."""
  conv: Any                       # the conv_general_dilated eqn
  affine: list[_Affine]
  residual: Any = None            # jaxpr var of the residual operand, or None
  relu: bool = False
  interior: set[int] = dataclasses.field(default_factory=set)  # eqn indices skipped
  last: int = -1                  # eqn index where the fused op is emitted


def _is_var(atom) -> bool:
  return isinstance(atom, jex_core.Var)


def _plain_conv(eqn) -> bool:
  """A float32 NHWC x HWIO conv without dilation or groups (the fast path's case)."""
  if eqn.primitive.name != "conv_general_dilated":
    return False
  params = eqn.params
  lhs, rhs = (v.aval for v in eqn.invars)
  if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return False
  expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, fast_conv.DIMENSION_NUMBERS)
  return (params["dimension_numbers"] == expected
          and tuple(params["lhs_dilation"]) == (1, 1) and tuple(params["rhs_dilation"]) == (1, 1)
          and params["feature_group_count"] == 1 and params["batch_group_count"] == 1
          and params.get("preferred_element_type") in (None, jnp.float32)
          and all(lo >= 0 and hi >= 0 for lo, hi in params["padding"]))


def _is_relu(eqn) -> bool:
  """jax.nn.relu (a custom_jvp around max(x, 0)) or a bare max(x, 0.0)."""
  if eqn.primitive.name == "custom_jvp_call":
    inner = eqn.params["call_jaxpr"].jaxpr
    names = [e.primitive.name for e in inner.eqns]
    if names and names[-1] in ("jit", "pjit"):
      inner = inner.eqns[-1].params["jaxpr"].jaxpr
      names = [e.primitive.name for e in inner.eqns]
    return len(eqn.invars) == 1 and names == ["max"] and _max_with_zero(inner.eqns[0])
  return eqn.primitive.name == "max" and _max_with_zero(eqn)


def _max_with_zero(eqn) -> bool:
  literals = [a for a in eqn.invars if isinstance(a, jex_core.Literal)]
  return len(literals) == 1 and float(literals[0].val) == 0.0


class _Analysis:
  """Consumers, image dependence and per-channel constants of one jaxpr."""

  def __init__(self, jaxpr, image_vars):
    self.jaxpr = jaxpr
    self.uses: dict[Any, list[int]] = {}
    self.producer: dict[Any, int] = {}
    self.outvars = {v for v in jaxpr.outvars if _is_var(v)}
    dependent = set(image_vars)
    for index, eqn in enumerate(jaxpr.eqns):
      for atom in eqn.invars:
        if _is_var(atom):
          self.uses.setdefault(atom, []).append(index)
      for var in eqn.outvars:
        self.producer[var] = index
      if any(_is_var(a) and a in dependent for a in eqn.invars):
        dependent.update(eqn.outvars)
    self.image_dependent = dependent

  def only_use(self, var) -> int | None:
    """The one eqn consuming `var`, or None (several uses, a program output, or none)."""
    uses = self.uses.get(var, [])
    return uses[0] if len(uses) == 1 and var not in self.outvars else None

  def channel_constant(self, atom, channels: int) -> bool:
    """`atom` is image-independent and constant over every axis but the last (channels)."""
    if not _is_var(atom):
      return jnp.ndim(atom.val) == 0
    if atom in self.image_dependent:
      return False
    shape = atom.aval.shape
    if all(size == 1 for size in shape[:-1]) and (not shape or shape[-1] in (1, channels)):
      return True
    index = self.producer.get(atom)
    if index is None:
      return False
    eqn = self.jaxpr.eqns[index]
    if eqn.primitive.name != "broadcast_in_dim":
      return False
    source = eqn.invars[0]
    rank = len(shape)
    dims = tuple(eqn.params["broadcast_dimensions"])
    for size, dim in zip(source.aval.shape, dims):
      if size != 1 and dim != rank - 1:
        return False
    return self.channel_constant(source, channels)


def _match_chains(jaxpr, image_vars) -> dict[int, _Chain]:
  """Chains by the index of the eqn that emits them (greedy, in program order)."""
  analysis = _Analysis(jaxpr, image_vars)
  claimed: set[int] = set()
  chains: dict[int, _Chain] = {}
  for index, eqn in enumerate(jaxpr.eqns):
    if index in claimed or not _plain_conv(eqn):
      continue
    channels = eqn.outvars[0].aval.shape[-1]
    full_shape = eqn.outvars[0].aval.shape
    chain = _Chain(conv=eqn, affine=[], interior={index}, last=index)
    var = eqn.outvars[0]
    while True:
      next_index = analysis.only_use(var)
      if next_index is None or next_index in claimed:
        break
      nxt = jaxpr.eqns[next_index]
      name = nxt.primitive.name
      if chain.relu:
        break
      if name in _AFFINE and chain.residual is None and len(nxt.invars) == 2:
        other_first = nxt.invars[1] is var
        other = nxt.invars[0] if other_first else nxt.invars[1]
        if analysis.channel_constant(other, channels) and not (other_first and name == "div"):
          if nxt.outvars[0].aval.shape != full_shape:
            break
          chain.affine.append(_Affine(name, other, other_first))
        elif (name == "add" and _is_var(other) and other in analysis.image_dependent
              and other.aval.shape == full_shape and other.aval.dtype == jnp.float32):
          chain.residual = other
        else:
          break
      elif _is_relu(nxt):
        chain.relu = True
      else:
        break
      chain.interior.add(next_index)
      chain.last = next_index
      var = nxt.outvars[0]
    claimed |= chain.interior
    chains[chain.last] = chain
  return chains


def _scale_and_shift(affine: list[_Affine], read, channels: int) -> tuple[Any, Any]:
  """The chain's per-channel affine map as (scale, shift) vectors: v -> v * scale + shift."""
  scale = jnp.ones((channels,), jnp.float32)
  shift = jnp.zeros((channels,), jnp.float32)
  for step in affine:
    # A per-channel constant of any broadcastable shape: its last `channels` values (or one).
    flat = jnp.reshape(jnp.asarray(read(step.operand), jnp.float32), (-1,))
    constant = flat[-channels:] if flat.size >= channels else jnp.broadcast_to(flat, (channels,))
    if step.op == "add":
      shift = shift + constant
    elif step.op == "sub" and step.constant_first:
      scale, shift = -scale, constant - shift
    elif step.op == "sub":
      shift = shift - constant
    elif step.op == "mul":
      scale, shift = scale * constant, shift * constant
    else:  # v / c
      scale, shift = scale / constant, shift / constant
  return scale, shift


def _evaluate(jaxpr, consts, args, chains: dict[int, _Chain], native: bool):
  """`jax.core.eval_jaxpr` with each chain replaced by one fused convolution."""
  env: dict[Any, Any] = {}

  def read(atom):
    return atom.val if isinstance(atom, jex_core.Literal) else env[atom]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  skipped = set().union(*(chain.interior for chain in chains.values())) if chains else set()
  for index, eqn in enumerate(jaxpr.eqns):
    chain = chains.get(index)
    if chain is not None:
      env[eqn.outvars[0]] = _emit(chain, read, native)
      continue
    if index in skipped:
      continue
    bound = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) before jax 0.10
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    with eqn.ctx.manager:
      outs = eqn.primitive.bind(*subfuns, *map(read, eqn.invars), **params)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for var, value in zip(eqn.outvars, outs):
      env[var] = value
  return [read(atom) for atom in jaxpr.outvars]


def _emit(chain: _Chain, read, native: bool):
  x, kernel = (read(v) for v in chain.conv.invars)
  channels = kernel.shape[-1]
  strides = tuple(int(s) for s in chain.conv.params["window_strides"])
  padding = tuple((int(lo), int(hi)) for lo, hi in chain.conv.params["padding"])
  scale, shift = _scale_and_shift(chain.affine, read, channels)
  residual = None if chain.residual is None else read(chain.residual)
  return fast_conv.conv2d_bias_act(x, kernel * scale, shift, residual, strides, padding,
                                   chain.relu, native)


def fusion_plan(model: nn.Module, variables: Any, x: jax.Array) -> list[dict[str, Any]]:
  """What the rewrite fuses for these shapes: one record per convolution (for reports, tests)."""
  closed = _trace(model, variables, x)
  image_vars = closed.jaxpr.invars[-1:]
  records = []
  for chain in _match_chains(closed.jaxpr, image_vars).values():
    records.append({"kernel": tuple(chain.conv.invars[1].aval.shape),
                    "strides": tuple(chain.conv.params["window_strides"]),
                    "affine_ops": len(chain.affine), "residual": chain.residual is not None,
                    "relu": chain.relu})
  return records


def _trace(model, variables, x):
  abstract = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
  apply = lambda v, images: model.apply(v, images, train=False)
  return jax.make_jaxpr(apply)(jax.tree.map(abstract, variables), abstract(x))


@functools.lru_cache(maxsize=None)
def fused_logits_fn(model: nn.Module, native_kernels: bool = True) -> Callable[..., jax.Array]:
  """`logits_fn(variables, x)`: the model in eval mode with its conv -> BN -> ReLU chains fused.

  One function object per (model, setting), so compiled attacks are reused. Values and input
  gradients equal the plain eval-mode model's to float tolerance (the BatchNorm folding
  reassociates float operations).
  """
  def logits_fn(variables: Any, x: jax.Array) -> jax.Array:
    closed = _trace(model, variables, x)
    chains = _match_chains(closed.jaxpr, closed.jaxpr.invars[-1:])
    leaves = jax.tree.leaves(variables) + [x]
    (logits,) = _evaluate(closed.jaxpr, closed.consts, leaves, chains, native_kernels)
    return logits

  return logits_fn

"""The native direct CPU convolution (see conv2d_cpu.cc) as JAX operations.

`conv2d` computes forward values only: `models.fast_conv` uses it for the forward pass and the
input gradient of its custom VJP, where every convolution is a plain forward convolution.
`kernel_gradient` is the VJP's kernel (weight) gradient, a reduction over images and pixels.
`conv2d_fused` is the forward with a fused epilogue (per-channel bias, a residual, ReLU) and an
input gate (inputs whose gate is not positive read as zero: a ReLU's input gradient), which
frozen networks use for their folded conv -> BatchNorm -> ReLU [-> add -> ReLU] layers.
Under `vmap` an extra batch axis of the input is folded into the image axis (one call); a
batched kernel (or a per-element kernel gradient) falls back to XLA's convolution. Under a
sharded `jit`, the calls are partitioned along the image axis, so each device works on its own
share (kernel gradients are then summed over the devices).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from adcorda_jax.native import build

Padding = tuple[tuple[int, int], tuple[int, int]]
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def available() -> bool:
  """True when the kernel is built and loaded and JAX's default backend is the CPU."""
  return jax.default_backend() == "cpu" and build.conv2d_kernel() is not None


def output_shape(x_shape, kernel_shape, strides, padding) -> tuple[int, int, int, int]:
  """NHWC output shape of an HWIO convolution with explicit (non-negative) padding."""
  size = lambda n, k, s, pads: (n + pads[0] + pads[1] - k) // s + 1
  return (x_shape[0], size(x_shape[1], kernel_shape[0], strides[0], padding[0]),
          size(x_shape[2], kernel_shape[1], strides[1], padding[1]), kernel_shape[3])


def _ffi_conv(x, kernel, strides, padding):
  shape = output_shape(x.shape, kernel.shape, strides, padding)
  # vmap never reaches this call (conv2d's custom_vmap rule folds batches); "sequential" is
  # only the explicit answer for code that vmaps it directly.
  call = jax.ffi.ffi_call(build.conv2d_kernel().target, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")
  return call(x, kernel, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(padding[0][0]), pad_bottom=np.int64(padding[0][1]),
              pad_left=np.int64(padding[1][0]), pad_right=np.int64(padding[1][1]))


def _ffi_kernel_gradient(x, dy, kernel_hw, strides, padding):
  shape = tuple(kernel_hw) + (x.shape[3], dy.shape[3])
  call = jax.ffi.ffi_call(build.conv2d_kernel().kernel_grad_target,
                          jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
  return call(x, dy, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(padding[0][0]), pad_bottom=np.int64(padding[0][1]),
              pad_left=np.int64(padding[1][0]), pad_right=np.int64(padding[1][1]))


# Optional operands of the fused convolution, in the FFI call's argument order, and their
# sharding-rule factors (bias per output channel; residual like the output; gate like x).
FUSED_OPERANDS = ("bias", "residual", "gate")
_FUSED_FACTORS = {"bias": "o", "residual": "n p q o", "gate": "n h w c"}


def _ffi_conv_fused(x, kernel, operands: dict, strides, padding, relu: bool):
  shape = output_shape(x.shape, kernel.shape, strides, padding)
  empty = jnp.zeros((0,), jnp.float32)
  call = jax.ffi.ffi_call(build.conv2d_kernel().fused_target,
                          jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
  extras = [operands.get(name, empty) for name in FUSED_OPERANDS]
  return call(x, kernel, *extras, stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(padding[0][0]), pad_bottom=np.int64(padding[0][1]),
              pad_left=np.int64(padding[1][0]), pad_right=np.int64(padding[1][1]),
              relu=np.int64(relu))


def reference_conv_fused(x, kernel, strides, padding, bias=None, residual=None, gate=None,
                         relu: bool = False) -> jax.Array:
  """What `conv2d_fused` computes, in XLA operations (its fallback and its test oracle)."""
  if gate is not None:
    x = jnp.where(gate > 0, x, 0.0)
  y = lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=DIMENSION_NUMBERS)
  if bias is not None:
    y = y + bias
  if residual is not None:
    y = y + residual
  return jnp.maximum(y, 0.0) if relu else y


def _image_axis_sharding(mesh, sharding, rank: int) -> NamedSharding:
  """`sharding` restricted to the image axis (other axes replicated)."""
  spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
  first = spec[0] if len(spec) else None
  return NamedSharding(mesh, PartitionSpec(first, *([None] * (rank - 1))))


@functools.lru_cache(maxsize=None)
def _partitioned(strides: tuple[int, int], padding: Padding):
  """The FFI call for one geometry, partitioned along the image axis under a sharded jit."""

  @custom_partitioning
  def conv(x, kernel):
    return _ffi_conv(x, kernel, strides, padding)

  def infer(mesh, arg_shapes, result_shape):
    return _image_axis_sharding(mesh, arg_shapes[0].sharding, 4)

  def partition(mesh, arg_shapes, result_shape):
    x_sharding = _image_axis_sharding(mesh, arg_shapes[0].sharding, 4)
    kernel_sharding = NamedSharding(mesh, PartitionSpec())
    return (mesh, lambda x, kernel: _ffi_conv(x, kernel, strides, padding), x_sharding,
            (x_sharding, kernel_sharding))

  conv.def_partition(infer_sharding_from_operands=infer, partition=partition,
                     sharding_rule="n h w c, i j c o -> n p q o",
                     need_replication_factors=("h", "w", "c", "i", "j", "o", "p", "q"))
  return conv


@functools.lru_cache(maxsize=None)
def _batched(strides: tuple[int, int], padding: Padding):
  """The partitioned call with a vmap rule that folds vmapped inputs into the image axis."""

  @jax.custom_batching.custom_vmap
  def conv(x, kernel):
    return _partitioned(strides, padding)(x, kernel)

  @conv.def_vmap
  def conv_vmap(axis_size, in_batched, x, kernel):
    x_batched, kernel_batched = in_batched
    if kernel_batched:  # One kernel per vmapped element: XLA's convolution, vmapped.
      xla = lambda xi, ki: lax.conv_general_dilated(xi, ki, strides, padding,
                                                    dimension_numbers=DIMENSION_NUMBERS)
      return jax.vmap(xla, in_axes=(0 if x_batched else None, 0))(x, kernel), True
    if not x_batched:
      return conv(x, kernel), False
    y = conv(x.reshape((-1,) + x.shape[2:]), kernel)
    return y.reshape((axis_size, x.shape[1]) + y.shape[1:]), True

  return conv


@functools.lru_cache(maxsize=None)
def _partitioned_fused(strides: tuple[int, int], padding: Padding, relu: bool,
                       names: tuple[str, ...]):
  """The fused call for one geometry and operand set (`names` from FUSED_OPERANDS), partitioned
  along the image axis: x, residual and gate split like x, kernel and bias replicated."""

  def lower(x, kernel, *extras):
    return _ffi_conv_fused(x, kernel, dict(zip(names, extras)), strides, padding, relu)

  conv = custom_partitioning(lower)

  def infer(mesh, arg_shapes, result_shape):
    return _image_axis_sharding(mesh, arg_shapes[0].sharding, 4)

  def partition(mesh, arg_shapes, result_shape):
    x_sharding = _image_axis_sharding(mesh, arg_shapes[0].sharding, 4)
    replicated = NamedSharding(mesh, PartitionSpec())
    extras = tuple(replicated if name == "bias" else x_sharding for name in names)
    return mesh, lower, x_sharding, (x_sharding, replicated) + extras

  rule = ", ".join(["n h w c", "i j c o"] + [_FUSED_FACTORS[name] for name in names])
  conv.def_partition(infer_sharding_from_operands=infer, partition=partition,
                     sharding_rule=f"{rule} -> n p q o",
                     need_replication_factors=("h", "w", "c", "i", "j", "o", "p", "q"))
  return conv


@functools.lru_cache(maxsize=None)
def _batched_fused(strides: tuple[int, int], padding: Padding, relu: bool,
                   names: tuple[str, ...]):
  """The partitioned fused call with a vmap rule: vmapped x (and residual, gate) fold into the
  image axis; a vmapped kernel or bias, or an unbatched x with batched others, use XLA's."""

  @jax.custom_batching.custom_vmap
  def conv(x, kernel, *extras):
    return _partitioned_fused(strides, padding, relu, names)(x, kernel, *extras)

  @conv.def_vmap
  def conv_vmap(axis_size, in_batched, x, kernel, *extras):
    x_batched, kernel_batched, *extras_batched = in_batched
    per_element = dict(zip(names, extras_batched))
    foldable = (x_batched and not kernel_batched and not per_element.get("bias", False)
                and all(per_element[name] for name in names if name != "bias"))
    if foldable:
      fold = lambda a: a.reshape((-1,) + a.shape[2:])
      folded = [a if name == "bias" else fold(a) for name, a in zip(names, extras)]
      y = conv(fold(x), kernel, *folded)
      return y.reshape((axis_size, x.shape[1]) + y.shape[1:]), True
    if not any(in_batched):
      return conv(x, kernel, *extras), False

    def xla(xi, ki, *extras_i):
      return reference_conv_fused(xi, ki, strides, padding, relu=relu,
                                  **dict(zip(names, extras_i)))
    axes = tuple(0 if batched else None for batched in in_batched)
    return jax.vmap(xla, in_axes=axes)(x, kernel, *extras), True

  return conv


@functools.lru_cache(maxsize=None)
def _partitioned_kernel_gradient(kernel_hw: tuple[int, int], strides: tuple[int, int],
                                 padding: Padding):
  """The kernel-gradient call for one geometry; under a sharded jit each device reduces its
  share of the images and the partial gradients are summed over the image axis's devices."""

  @custom_partitioning
  def gradient(x, dy):
    return _ffi_kernel_gradient(x, dy, kernel_hw, strides, padding)

  def infer(mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, PartitionSpec())

  def partition(mesh, arg_shapes, result_shape):
    x_sharding = _image_axis_sharding(mesh, arg_shapes[0].sharding, 4)
    axis = x_sharding.spec[0]

    def lower(x, dy):
      partial = _ffi_kernel_gradient(x, dy, kernel_hw, strides, padding)
      return partial if axis is None else jax.lax.psum(partial, axis)

    return mesh, lower, NamedSharding(mesh, PartitionSpec()), (x_sharding, x_sharding)

  gradient.def_partition(infer_sharding_from_operands=infer, partition=partition,
                         sharding_rule="n h w c, n p q o -> i j c o",
                         need_replication_factors=("h", "w", "c", "p", "q", "o", "i", "j"))
  return gradient


@functools.lru_cache(maxsize=None)
def _batched_kernel_gradient(kernel_hw: tuple[int, int], strides: tuple[int, int],
                             padding: Padding):
  """The partitioned kernel gradient with a vmap rule: one gradient per vmapped element."""

  @jax.custom_batching.custom_vmap
  def gradient(x, dy):
    return _partitioned_kernel_gradient(kernel_hw, strides, padding)(x, dy)

  @gradient.def_vmap
  def gradient_vmap(axis_size, in_batched, x, dy):
    def xla(xi, dyi):
      kernel = jnp.zeros(tuple(kernel_hw) + (xi.shape[3], dyi.shape[3]), jnp.float32)
      _, vjp = jax.vjp(lambda k: lax.conv_general_dilated(
          xi, k, strides, padding, dimension_numbers=DIMENSION_NUMBERS), kernel)
      return vjp(dyi)[0]
    axes = tuple(0 if batched else None for batched in in_batched)
    return jax.vmap(xla, in_axes=axes)(x, dy), True

  return gradient


def _pad_channels(array: jax.Array) -> tuple[jax.Array, int]:
  """`array` with its last (output-channel) axis zero-padded to the kernel's vector width."""
  extra = -array.shape[-1] % build.conv2d_kernel().lanes
  if extra:
    array = jnp.pad(array, ((0, 0),) * (array.ndim - 1) + ((0, extra),))
  return array, extra


def _static_geometry(strides, padding, name: str) -> tuple[tuple[int, int], Padding]:
  """Strides and padding as hashable ints (the FFI attributes); padding must be non-negative."""
  strides = (int(strides[0]), int(strides[1]))
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if min(min(pair) for pair in padding) < 0:
    raise ValueError(f"native {name} takes non-negative padding, got {padding}")
  return strides, padding


def kernel_gradient(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int],
                    strides: tuple[int, int], padding: Padding) -> jax.Array:
  """d(sum(dy * conv(x, kernel))) / d kernel, an HWIO array, by the native kernel.

  Same conventions as `conv2d` (float32, explicit non-negative padding; output channels are
  zero-padded to the vector width and sliced back). Values equal the kernel cotangent of
  `lax.conv_general_dilated` up to float32 summation order.
  """
  out_channels = dy.shape[-1]
  dy, extra = _pad_channels(dy)
  strides, padding = _static_geometry(strides, padding, "kernel_gradient")
  kernel_hw = (int(kernel_hw[0]), int(kernel_hw[1]))
  dw = _batched_kernel_gradient(kernel_hw, strides, padding)(x.astype(jnp.float32),
                                                             dy.astype(jnp.float32))
  return dw[..., :out_channels] if extra else dw


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: Padding) -> jax.Array:
  """NHWC x HWIO float32 convolution with explicit padding, by the native kernel.

  Padding must be non-negative (crop the input instead). Output channels are zero-padded to the
  kernel's vector width and sliced back. Call only when `available()`; values equal
  `lax.conv_general_dilated` up to float32 summation order.
  """
  out_channels = kernel.shape[-1]
  kernel, extra = _pad_channels(kernel)
  strides, padding = _static_geometry(strides, padding, "conv2d")
  y = _batched(strides, padding)(x.astype(jnp.float32), kernel.astype(jnp.float32))
  return y[..., :out_channels] if extra else y


def conv2d_fused(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding,
                 bias: jax.Array | None = None, residual: jax.Array | None = None,
                 gate: jax.Array | None = None, relu: bool = False) -> jax.Array:
  """[relu](conv(where(gate > 0, x, 0), kernel) [+ bias] [+ residual]) by the native kernel.

  `bias` has one value per output channel, `residual` the output's shape, `gate` the input's.
  Same conventions as `conv2d`; the epilogue runs on each output block while it is still in
  registers, and the gate while the input rows are padded, so none of them costs a pass over
  memory. Values equal `reference_conv_fused` up to float32 summation order.
  """
  out_channels = kernel.shape[-1]
  kernel, extra = _pad_channels(kernel)
  strides, padding = _static_geometry(strides, padding, "conv2d_fused")
  operands = {"bias": bias, "residual": residual, "gate": gate}
  names = tuple(name for name in FUSED_OPERANDS if operands[name] is not None)
  extras = []
  for name in names:
    value = operands[name].astype(jnp.float32)
    if name == "bias":
      value = jnp.broadcast_to(value, (out_channels,))
    if name != "gate" and extra:
      value = _pad_channels(value)[0]
    extras.append(value)
  y = _batched_fused(strides, padding, bool(relu), names)(
      x.astype(jnp.float32), kernel.astype(jnp.float32), *extras)
  return y[..., :out_channels] if extra else y

"""The native direct CPU convolution (see conv2d_cpu.cc) as JAX operations.

`conv2d` computes forward values only: `models.fast_conv` uses it for the forward pass and the
input gradient of its custom VJP, where every convolution is a plain forward convolution.
`kernel_gradient` is the VJP's kernel (weight) gradient, a reduction over images and pixels.
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

"""`conv2d`: the native direct CPU convolution (see conv2d_cpu.cc) as a JAX operation.

Forward values only: `models.fast_conv` uses it for the forward pass and the input gradient of
its custom VJP, where every convolution is a plain forward convolution. Under `vmap` an extra
batch axis of the input is folded into the image axis (one call); a batched kernel falls back
to XLA's convolution. Under a sharded `jit`, the call is partitioned along the image axis, so
each device convolves its own share.
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


def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
           padding: Padding) -> jax.Array:
  """NHWC x HWIO float32 convolution with explicit padding, by the native kernel.

  Padding must be non-negative (crop the input instead). Output channels are zero-padded to the
  kernel's vector width and sliced back. Call only when `available()`; values equal
  `lax.conv_general_dilated` up to float32 summation order.
  """
  lanes = build.conv2d_kernel().lanes
  out_channels = kernel.shape[-1]
  extra = -out_channels % lanes
  if extra:
    kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, extra)))
  strides = (int(strides[0]), int(strides[1]))
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if min(min(pair) for pair in padding) < 0:
    raise ValueError(f"native conv2d takes non-negative padding, got {padding}")
  y = _batched(strides, padding)(x.astype(jnp.float32), kernel.astype(jnp.float32))
  return y[..., :out_channels] if extra else y

"""A 2-D NHWC convolution whose input gradient runs on XLA:CPU's fast convolution path.

Attacks differentiate the network with respect to its *input*, so every step runs the transposed
convolution of every layer. Autodiff expresses it as a convolution with a reversed, in/out-swapped
kernel in a non-canonical layout (and, for strided layers, a dilated input); inside a compiled
loop XLA:CPU runs those through a generic kernel several times slower than its forward path.
`conv2d` has the same forward pass but a custom VJP that computes the input gradient as ordinary
forward convolutions with explicitly materialized (tiny) kernels:

* stride 1: one convolution of the output gradient with the flipped, in/out-swapped kernel;
* stride s > 1: the s*s output phases of the transposed convolution as ONE stride-1 convolution
  whose output channels are stacked phases, then a depth-to-space reshuffle. Autodiff's form
  dilates the input, so 3/4 of its multiplications (stride 2) are by inserted zeros; the stacked
  kernel has only a few zero taps (16 slots for the 9 taps of a 3x3 stride-2 kernel);
* few input channels (an RGB or gray image, the gradient the attack asks for): computed for 8
  zero-padded channels and sliced, because a convolution with 1-3 output channels wastes most
  of each SIMD register (measured 1.4x faster for ResNet-20's 3-channel stem).

Every one of these forward convolutions runs on the native direct-convolution kernel
(`adcorda_jax.native`: 1.2-1.9x XLA:CPU's at 16-64 channels, 5x for a 3-channel stem) when it
could be built, else on XLA's. The kernel (weight) gradient, which training needs, runs on the
native kernel's reduction over images and pixels (`native.conv2d.kernel_gradient`), else it is
autodiff's. Results equal `jax.grad` of `lax.conv_general_dilated` up to float32 summation order
(tested).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from adcorda_jax.native import conv2d as native_conv

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# Input gradients with fewer channels (an RGB or gray image) are computed this wide.
NARROW_CHANNELS = 8

Padding = tuple[tuple[int, int], tuple[int, int]]


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
              padding: Padding) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=DIMENSION_NUMBERS)


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding,
          native: bool, gate: jax.Array | None = None) -> jax.Array:
  """A forward convolution: the native CPU kernel if `native` and available, else XLA's.

  `gate` (x's shape): inputs whose gate is not positive count as zero (a ReLU's input
  gradient); the native kernel applies it while padding its input rows.

  Negative padding (input gradients of layers padded more than kernel-1) is applied as an
  explicit crop: XLA:CPU (jaxlib 0.10.2) computes wrong values for convolutions with several
  input channels whose padding is negative at one end of a spatial axis and positive at the
  other, e.g. (-1, 1).
  """
  crop = tuple(slice(max(-lo, 0), size + min(hi, 0))
               for size, (lo, hi) in zip(x.shape[1:3], padding))
  if any(part.start or part.stop != size for part, size in zip(crop, x.shape[1:3])):
    x = x[:, crop[0], crop[1], :]
    gate = None if gate is None else gate[:, crop[0], crop[1], :]
    padding = tuple((max(lo, 0), max(hi, 0)) for lo, hi in padding)
  if native and native_conv.available():
    if gate is not None:
      return native_conv.conv2d_fused(x, kernel, strides, padding, gate=gate)
    return native_conv.conv2d(x, kernel, strides, padding)
  if gate is not None:
    x = jnp.where(gate > 0, x, 0.0)
  return _xla_conv(x, kernel, strides, padding)


def _flipped_kernel_gradient(dy, kernel, padding, native, gate=None):
  """Stride 1: dx = conv(dy, flip(kernel) with in/out swapped), a canonical HWIO kernel.

  Padding each side by k-1-pad gives exactly the input size back.
  """
  pads = [(size - 1 - lo, size - 1 - hi) for size, (lo, hi) in zip(kernel.shape[:2], padding)]
  swapped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  return _conv(dy, swapped, (1, 1), pads, native, gate)


def _phase_layout(size: int, out_size: int, taps: int, stride: int, pad_low: int):
  """1-D plan of a strided transposed convolution split into `stride` output phases.

  Output position m = stride*p + r (phase r) receives dy[p + q_r - j] * w[c_r + stride*j] for
  c_r = (r + pad_low) % stride, q_r = (r + pad_low) // stride. Every phase becomes a stride-1
  correlation of dy with a common window of `length` slots starting at offset `base`; returns
  (per-phase list of (tap, slot), length, phase_size, (pad_lo, pad_hi)).
  """
  plans = []
  for phase in range(stride):
    first = (phase + pad_low) % stride
    phase_taps = list(range(first, taps, stride))
    plans.append((phase_taps, (phase + pad_low - first) // stride))
  used = [(phase_taps, q) for phase_taps, q in plans if phase_taps]
  base = min(q - len(phase_taps) + 1 for phase_taps, q in used)
  length = max(q + 1 for _, q in used) - base
  phase_size = -(-size // stride)
  slots = []
  for phase_taps, q in plans:
    count = len(phase_taps)
    start = q - count + 1 - base
    slots.append([(phase_taps[j], start + count - 1 - j) for j in range(count)])
  pads = (-base, phase_size - 1 + length - 1 + base - (out_size - 1))
  return slots, length, phase_size, pads


def _phase_gradient(dy, kernel, x_shape, strides, padding, native, gate=None):
  """Strided layers: all stride*stride phases as one stride-1 conv, then depth-to-space."""
  batch, height, width, channels = x_shape
  out_channels = kernel.shape[3]
  rows = _phase_layout(height, dy.shape[1], kernel.shape[0], strides[0], padding[0][0])
  cols = _phase_layout(width, dy.shape[2], kernel.shape[1], strides[1], padding[1][0])
  (row_slots, row_len, row_size, row_pads) = rows
  (col_slots, col_len, col_size, col_pads) = cols
  swapped = kernel.transpose(0, 1, 3, 2)  # [kh, kw, out, in]
  stacked = jnp.zeros((row_len, col_len, out_channels, strides[0], strides[1], channels),
                      kernel.dtype)
  for row_phase, row_plan in enumerate(row_slots):
    for col_phase, col_plan in enumerate(col_slots):
      for row_tap, row_slot in row_plan:
        for col_tap, col_slot in col_plan:
          stacked = stacked.at[row_slot, col_slot, :, row_phase, col_phase, :].set(
              swapped[row_tap, col_tap])
  stacked = stacked.reshape(row_len, col_len, out_channels, -1)
  phases = _conv(dy, stacked, (1, 1), (row_pads, col_pads), native, gate)
  phases = phases.reshape(batch, row_size, col_size, strides[0], strides[1], channels)
  dx = phases.transpose(0, 1, 3, 2, 4, 5).reshape(
      batch, row_size * strides[0], col_size * strides[1], channels)
  return dx[:, :height, :width, :]


def input_gradient(dy: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...],
                   strides: tuple[int, int], padding: Padding,
                   native: bool = True, gate: jax.Array | None = None) -> jax.Array:
  """d(sum(dy * conv(x, kernel))) / dx, using only canonical forward convolutions.

  `native`: run them with the native CPU kernel where it is available (adcorda_jax.native).
  `gate` (dy's shape): use where(gate > 0, dy, 0) for dy, fused into the convolution's input.
  """
  channels = x_shape[-1]
  if channels < NARROW_CHANNELS:
    # Zero kernels for extra input channels give the gradient more output channels to fill
    # SIMD registers with; the extra channels are sliced off.
    padded = jnp.pad(kernel, ((0, 0), (0, 0), (0, NARROW_CHANNELS - channels), (0, 0)))
    wide_shape = tuple(x_shape[:-1]) + (NARROW_CHANNELS,)
    return input_gradient(dy, padded, wide_shape, strides, padding, native,
                          gate)[..., :channels]
  if tuple(strides) != (1, 1):
    return _phase_gradient(dy, kernel, x_shape, strides, padding, native, gate)
  return _flipped_kernel_gradient(dy, kernel, padding, native, gate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding,
           native: bool = True) -> jax.Array:
  """NHWC x HWIO convolution with explicit padding; gradients as described in the module doc.

  `native`: forward and input-gradient convolutions use the native CPU kernel where available.
  """
  return _conv(x, kernel, strides, padding, native)


def _conv2d_forward(x, kernel, strides, padding, native):
  return _conv(x, kernel, strides, padding, native), (x, kernel)


def kernel_gradient(x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...],
                    strides: tuple[int, int], padding: Padding,
                    native: bool = True) -> jax.Array:
  """d(sum(dy * conv(x, kernel))) / d kernel: the native CPU kernel's reduction over images and
  pixels where available (and the padding is non-negative), else autodiff of XLA's convolution."""
  if native and native_conv.available() and min(min(pair) for pair in padding) >= 0:
    return native_conv.kernel_gradient(x, dy, kernel_shape[:2], strides, padding)
  kernel = jnp.zeros(kernel_shape, x.dtype)
  _, kernel_vjp = jax.vjp(lambda k: _xla_conv(x, k, strides, padding), kernel)
  return kernel_vjp(dy)[0]


def _conv2d_backward(strides, padding, native, residuals, dy):
  x, kernel = residuals
  dx = input_gradient(dy, kernel, x.shape, strides, padding, native)
  return dx, kernel_gradient(x, dy, kernel.shape, strides, padding, native).astype(kernel.dtype)


conv2d.defvjp(_conv2d_forward, _conv2d_backward)


# ---- The fused layer of frozen networks: relu(conv(x, kernel) + bias [+ residual]).


def _fused_forward_values(x, kernel, bias, residual, strides, padding, relu, native):
  if native and native_conv.available() and min(min(pair) for pair in padding) >= 0:
    return native_conv.conv2d_fused(x, kernel, strides, padding, bias=bias, residual=residual,
                                    relu=relu)
  return native_conv.reference_conv_fused(x, kernel, strides, padding, bias=bias,
                                          residual=residual, relu=relu)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def conv2d_bias_act(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                    residual: jax.Array | None, strides: tuple[int, int], padding: Padding,
                    relu: bool, native: bool = True) -> jax.Array:
  """[relu](conv(x, kernel) + bias [+ residual]): a folded conv -> BatchNorm -> ReLU layer.

  Forward on the native kernel with the bias, residual and ReLU in its epilogue. Backward: the
  input gradient is `input_gradient` gated by the output (the ReLU mask fused into the
  convolution's input), kernel and bias gradients as `conv2d`'s, the residual's the masked
  cotangent. Values and gradients equal autodiff of `reference_conv_fused` to float tolerance.
  """
  return _fused_forward_values(x, kernel, bias, residual, strides, padding, relu, native)


def _bias_act_forward(x, kernel, bias, residual, strides, padding, relu, native):
  y = _fused_forward_values(x, kernel, bias, residual, strides, padding, relu, native)
  return y, (x, kernel, y if relu else None, residual is not None)


def _bias_act_backward(strides, padding, relu, native, saved, g):
  x, kernel, y, has_residual = saved
  masked = jnp.where(y > 0, g, 0.0) if relu else g
  dx = input_gradient(g, kernel, x.shape, strides, padding, native, gate=y if relu else None)
  dkernel = kernel_gradient(x, masked, kernel.shape, strides, padding, native)
  return (dx, dkernel.astype(kernel.dtype), masked.sum(axis=(0, 1, 2)),
          masked if has_residual else None)


conv2d_bias_act.defvjp(_bias_act_forward, _bias_act_backward)

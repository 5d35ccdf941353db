"""Building blocks shared by all models: input normalization, conv/BN factories, the basic block.

Every model takes float images in [0, 1] and normalizes them itself, so adversarial attacks can
work in pixel space. Every conv and BatchNorm is a named submodule, so the channel count of each
layer can be read from the parameter tree (filter pruning relies on this).

Models take an optional `channels` tuple: the output widths of their prunable convs (see each
model's `prunable_convs`). Empty means the default widths; parameter names never change, so a
pruned model is the same network with narrower layers.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adcorda_jax.registry import Registry

# A builder turns validated config values into a module:
# builder(num_classes=, width=, dropout=, mean=, std=, channels=()) -> nn.Module. The module has
# `default_channels()`, `layer_channels()` and `prunable_convs()` (see `PrunableConv`).
ModelBuilder = Callable[..., nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")

# He et al. (2015) normal init scaled by fan-out, as in the reference ResNet implementations.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class PrunableConv(NamedTuple):
  """A conv whose output filters can be removed, with the layers that must shrink with it.

  Paths are '/'-joined module names in the params tree. `next_layer` consumes the conv's output
  channels (after `bn` and ReLU): a conv (HWIO kernel, input axis 2) or a Dense over the flattened
  NHWC feature map (rows ordered H, W, C).
  """
  conv: str
  bn: str
  next_layer: str


def scaled_channels(base: int, width: float) -> int:
  """Channel count of a layer with `base` channels at width multiplier `width` (at least 1)."""
  return max(1, round(base * width))


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype: Any = None) -> jax.Array:
  """Maps [0, 1] NHWC images to (x - mean) / std with per-channel (or scalar) constants.

  Computed in float32, returned in `dtype` (the model's compute dtype; None keeps float32).
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"models expect float images in [0, 1], got dtype {x.dtype}")
  if x.ndim != 4:
    raise ValueError(f"models expect NHWC images, got shape {x.shape}")
  channels = x.shape[-1]
  for label, values in (("mean", mean), ("std", std)):
    if len(values) not in (1, channels):
      raise ValueError(
          f"{label} has {len(values)} values but images have {channels} channels")
  mean_array = jnp.asarray(mean, jnp.float32)
  std_array = jnp.asarray(std, jnp.float32)
  normalized = (x.astype(jnp.float32) - mean_array) / std_array
  return normalized if dtype is None else normalized.astype(dtype)


def float_outputs(dtype: Any, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Logits and features leave a reduced-precision model (`dtype` bfloat16) as float32.

  With `dtype` None (flax's default: the dtype follows the inputs and parameters) they are left
  as computed, so a float64 evaluation of the same model stays float64.
  """
  if dtype is None:
    return arrays
  return tuple(array.astype(jnp.promote_types(dtype, jnp.float32)) for array in arrays)


def conv(features: int, kernel_size: int, strides: int = 1, name: str | None = None,
         dtype: Any = None) -> nn.Conv:
  """A bias-free square conv with symmetric `kernel_size // 2` padding (PyTorch-style).

  `dtype` is the compute dtype (None: that of the inputs); the kernel is always float32.
  """
  pad = kernel_size // 2
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(strides, strides),
      padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=conv_kernel_init, name=name,
      dtype=dtype)


def batch_norm(train: bool, name: str | None = None, dtype: Any = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch-equivalent settings; batch statistics are used only in training.

  Statistics are reduced in float32 and kept in float32 whatever the compute `dtype`.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name,
                      dtype=dtype)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 max-pool (an odd last row/column is dropped, like VALID padding).

  Written as reshape + max because its gradient is several times cheaper on CPU than that of
  `nn.max_pool` (whose backward pass is XLA's slow select-and-scatter).
  """
  batch, height, width, channels = x.shape
  x = x[:, :height - height % 2, :width - width % 2, :]
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


def global_average_pool(x: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [N, C]."""
  return jnp.mean(x, axis=(1, 2))


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 conv-BN layers plus an identity or 1x1-projection shortcut.

  The projection (`shortcut_conv`, `shortcut_bn`) is used whenever the stride or the channel count
  changes, i.e. option B of He et al. (2016).
  """
  features: int
  strides: int = 1
  # Output channels of conv1 (bn1, conv2's input); None = `features`. Filter pruning shrinks it.
  inner_features: int | None = None
  dtype: Any = None  # Compute dtype (None: follow the inputs); parameters stay float32.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    residual = x
    inner = self.features if self.inner_features is None else self.inner_features
    dtype = self.dtype
    y = conv(inner, 3, self.strides, name="conv1", dtype=dtype)(x)
    y = nn.relu(batch_norm(train, name="bn1", dtype=dtype)(y))
    y = conv(self.features, 3, name="conv2", dtype=dtype)(y)
    y = batch_norm(train, name="bn2", dtype=dtype)(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = conv(self.features, 1, self.strides, name="shortcut_conv", dtype=dtype)(x)
      residual = batch_norm(train, name="shortcut_bn", dtype=dtype)(residual)
    return nn.relu(y + residual)


def block_names(blocks_per_stage: Sequence[int]) -> list[str]:
  """`stage{s}_block{b}` for every basic block, in the order the network applies them."""
  return [f"stage{stage}_block{block}"
          for stage, num_blocks in enumerate(blocks_per_stage, start=1)
          for block in range(num_blocks)]


def block_inner_channels(blocks_per_stage: Sequence[int],
                         channels: Sequence[int]) -> tuple[int, ...]:
  """Default inner width of every block: its stage's channel count."""
  return tuple(features for num_blocks, features in zip(blocks_per_stage, channels)
               for _ in range(num_blocks))


def block_prunable_convs(blocks_per_stage: Sequence[int]) -> tuple[PrunableConv, ...]:
  """Each block's conv1: pruning it shrinks bn1 and conv2's input, never the residual sum."""
  return tuple(PrunableConv(f"{name}/conv1", f"{name}/bn1", f"{name}/conv2")
               for name in block_names(blocks_per_stage))


class PrunableResNetChannels:
  """Channel bookkeeping shared by the ResNets: a mixin for flax modules with `width` and
  `channels` fields that set `BASE_STAGE_CHANNELS` and define `_stages()` (blocks per stage)."""
  BASE_STAGE_CHANNELS: ClassVar[tuple[int, ...]] = ()

  def stage_channels(self) -> tuple[int, ...]:
    """Block output widths per stage (never pruned, so residual sums always match)."""
    return tuple(scaled_channels(base, self.width) for base in self.BASE_STAGE_CHANNELS)

  def default_channels(self) -> tuple[int, ...]:
    """Unpruned inner width of every block, in order."""
    return block_inner_channels(self._stages(), self.stage_channels())

  def layer_channels(self) -> tuple[int, ...]:
    """The inner widths this module builds (`channels` or the defaults)."""
    return tuple(self.channels) or self.default_channels()

  def prunable_convs(self) -> tuple[PrunableConv, ...]:
    """Every block's conv1 (feeding bn1 and conv2), in order."""
    return block_prunable_convs(self._stages())


def residual_stages(x: jax.Array, blocks_per_stage: Sequence[int], channels: Sequence[int],
                    strides: Sequence[int], train: bool,
                    inner_channels: Sequence[int] = (), dtype: Any = None) -> jax.Array:
  """Applies stages of basic blocks; call it inside a compact `__call__` so blocks attach there.

  Stage `s` (1-based) has `blocks_per_stage[s-1]` blocks of `channels[s-1]` channels named
  `stage{s}_block{b}` (0-based `b`); its first block downsamples by `strides[s-1]`.
  `inner_channels` (one per block, in order; empty = the stage widths) sets each block's conv1.
  """
  names = block_names(blocks_per_stage)
  inner = tuple(inner_channels) or block_inner_channels(blocks_per_stage, channels)
  if len(inner) != len(names):
    raise ValueError(f"inner_channels needs {len(names)} values, got {len(inner)}")
  index = 0
  for stage, (num_blocks, features, stride) in enumerate(
      zip(blocks_per_stage, channels, strides), start=1):
    for block in range(num_blocks):
      x = BasicBlock(features, stride if block == 0 else 1, inner_features=inner[index],
                     dtype=dtype, name=names[index])(x, train)
      index += 1
  return x

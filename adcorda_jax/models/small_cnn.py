"""A small VGG-style CNN for 8x8 digits, 28x28 (Fashion-)MNIST and 32x32 colour images.

Two conv-conv-pool stages, a flatten + dense hidden layer (the penultimate features) and a linear
classifier. Cheap enough to train on Fashion-MNIST in minutes on a laptop CPU. `channels` overrides
the widths of conv1..conv4 (filter pruning); the hidden and classifier layers keep theirs.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

from adcorda_jax.models.common import (MODELS, PrunableConv, batch_norm, conv, float_outputs,
                                       max_pool_2x2, normalize, scaled_channels)

# The second 2x2 max-pool is applied only to feature maps at least this large, so 8x8 inputs
# (4x4 after the first pool) keep a 4x4 map instead of collapsing to 2x2.
MIN_SIZE_FOR_SECOND_POOL = 8


class SmallCNN(nn.Module):
  """conv32-conv32-pool, conv64-conv64-[pool], flatten, dense128-ReLU, dropout, dense."""
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  width: float = 1.0
  dropout: float = 0.0
  # Output channels of conv1..conv4; () = the defaults at `width`.
  channels: tuple[int, ...] = ()
  # Compute dtype (`train.compute_dtype`: bfloat16); None follows the inputs (float32). Parameters,
  # logits and features stay float32.
  dtype: Any = None

  def default_channels(self) -> tuple[int, ...]:
    """conv1..conv4 widths at `width`: 32, 32, 64, 64 scaled."""
    narrow = scaled_channels(32, self.width)
    wide = scaled_channels(64, self.width)
    return (narrow, narrow, wide, wide)

  def layer_channels(self) -> tuple[int, ...]:
    """The conv1..conv4 widths this module builds (`channels` or the defaults)."""
    return tuple(self.channels) or self.default_channels()

  def prunable_convs(self) -> tuple[PrunableConv, ...]:
    """conv1..conv4, each feeding the next conv; conv4 feeds the flattened `hidden` Dense."""
    return tuple(PrunableConv(f"conv{i}", f"bn{i}", f"conv{i + 1}" if i < 4 else "hidden")
                 for i in range(1, 5))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    x = normalize(x, self.mean, self.std, self.dtype)
    for index, channels in enumerate(self.layer_channels(), start=1):
      x = conv(channels, 3, name=f"conv{index}", dtype=self.dtype)(x)
      x = nn.relu(batch_norm(train, name=f"bn{index}", dtype=self.dtype)(x))
      if index == 2 or (index == 4 and min(x.shape[1:3]) >= MIN_SIZE_FOR_SECOND_POOL):
        x = max_pool_2x2(x)
    x = x.reshape((x.shape[0], -1))
    features = nn.relu(nn.Dense(scaled_channels(128, self.width), name="hidden",
                                dtype=self.dtype)(x))
    x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(features)
    logits = nn.Dense(self.num_classes, name="classifier", dtype=self.dtype)(x)
    logits, features = float_outputs(self.dtype, logits, features)
    return (logits, features) if return_features else logits


@MODELS.register("small_cnn")
def build_small_cnn(*, num_classes: int, width: float, dropout: float, mean: Sequence[float],
                    std: Sequence[float], channels: Sequence[int] = ()) -> SmallCNN:
  """Builds a `SmallCNN` from validated config values."""
  return SmallCNN(num_classes=num_classes, mean=tuple(mean), std=tuple(std), width=width,
                  dropout=dropout, channels=tuple(channels))

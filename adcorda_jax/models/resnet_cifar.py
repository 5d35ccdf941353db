"""CIFAR-style ResNets (He et al. 2016, section 4.2): 6n+2 layers for 32x32 inputs.

A 3x3 conv stem with 16 channels, three stages of n basic blocks with 16/32/64 channels and
strides 1/2/2, global average pooling and a linear classifier. Shortcuts that change shape use a
1x1 conv + BN projection (option B), which adds a few thousand parameters over option A.

`channels` overrides the inner width (conv1 output) of each block, in order. Block outputs,
shortcuts and the stem keep their widths, so residual sums always match: this is how Li et al.
(2017) prune ResNets.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
from absl import logging

from adcorda_jax.models.common import (MODELS, PrunableResNetChannels, batch_norm, conv,
                                       float_outputs, global_average_pool, normalize,
                                       residual_stages, scaled_channels)

# Registered depth -> blocks per stage (depth = 6n + 2).
CIFAR_DEPTHS = {20: 3, 32: 5, 56: 9, 110: 18}


class ResNetCifar(PrunableResNetChannels, nn.Module):
  """ResNet-(6n+2) for small images; n = `blocks_per_stage`."""
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  blocks_per_stage: int = 3
  width: float = 1.0
  # Inner width (conv1 output) of every block, in order; () = the stage widths at `width`.
  channels: tuple[int, ...] = ()
  # Compute dtype (`train.compute_dtype`: bfloat16); None follows the inputs (float32). Parameters,
  # logits and features stay float32.
  dtype: Any = None

  BASE_STAGE_CHANNELS = (16, 32, 64)

  def _stages(self) -> tuple[int, ...]:
    return (self.blocks_per_stage,) * 3

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    x = normalize(x, self.mean, self.std, self.dtype)
    x = conv(scaled_channels(16, self.width), 3, name="conv1", dtype=self.dtype)(x)
    x = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(x))
    x = residual_stages(
        x, blocks_per_stage=self._stages(), channels=self.stage_channels(),
        strides=(1, 2, 2), train=train, inner_channels=self.layer_channels(), dtype=self.dtype)
    features = global_average_pool(x)
    logits = nn.Dense(self.num_classes, name="classifier", dtype=self.dtype)(features)
    logits, features = float_outputs(self.dtype, logits, features)
    return (logits, features) if return_features else logits


def build_resnet_cifar(*, depth: int, num_classes: int, width: float, dropout: float,
                       mean: Sequence[float], std: Sequence[float],
                       channels: Sequence[int] = ()) -> ResNetCifar:
  """Builds a CIFAR ResNet of the given registered depth from validated config values."""
  if dropout:
    logging.warning("model.dropout=%s is ignored: resnet%d has no dropout layer.", dropout, depth)
  return ResNetCifar(num_classes=num_classes, mean=tuple(mean), std=tuple(std),
                     blocks_per_stage=CIFAR_DEPTHS[depth], width=width, channels=tuple(channels))


for _depth in CIFAR_DEPTHS:
  MODELS.register(f"resnet{_depth}")(functools.partial(build_resnet_cifar, depth=_depth))

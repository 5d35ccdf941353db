"""ImageNet-style ResNet-18/34 (He et al. 2016) built from basic blocks.

A 7x7 stride-2 conv stem and a 3x3 stride-2 max-pool, four stages with 64/128/256/512 channels and
strides 1/2/2/2, global average pooling and a linear classifier. The total stride is 32, so inputs
should be at least 32x32 (64x64 Tiny-ImageNet-style crops and 224x224 both work). `channels`
overrides the inner width of each block (filter pruning, as in `resnet_cifar`).
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

# Registered depth -> basic blocks per stage.
IMAGENET_STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class ResNetImagenet(PrunableResNetChannels, nn.Module):
  """ResNet-18/34 with the torchvision layer layout (projection shortcuts when shapes change)."""
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2)
  width: float = 1.0
  # Inner width (conv1 output) of every block, in order; () = the stage widths at `width`.
  channels: tuple[int, ...] = ()
  # Compute dtype (`train.compute_dtype`: bfloat16); None follows the inputs (float32). Parameters,
  # logits and features stay float32.
  dtype: Any = None

  BASE_STAGE_CHANNELS = (64, 128, 256, 512)

  def _stages(self) -> tuple[int, ...]:
    return self.blocks_per_stage

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
    x = normalize(x, self.mean, self.std, self.dtype)
    x = conv(scaled_channels(64, self.width), 7, strides=2, name="conv1", dtype=self.dtype)(x)
    x = nn.relu(batch_norm(train, name="bn1", dtype=self.dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = residual_stages(
        x, blocks_per_stage=self._stages(), channels=self.stage_channels(),
        strides=(1, 2, 2, 2), train=train, inner_channels=self.layer_channels(), dtype=self.dtype)
    features = global_average_pool(x)
    logits = nn.Dense(self.num_classes, name="classifier", dtype=self.dtype)(features)
    logits, features = float_outputs(self.dtype, logits, features)
    return (logits, features) if return_features else logits


def build_resnet_imagenet(*, depth: int, num_classes: int, width: float, dropout: float,
                          mean: Sequence[float], std: Sequence[float],
                          channels: Sequence[int] = ()) -> ResNetImagenet:
  """Builds an ImageNet ResNet of the given registered depth from validated config values."""
  if dropout:
    logging.warning("model.dropout=%s is ignored: resnet%d has no dropout layer.", dropout, depth)
  return ResNetImagenet(num_classes=num_classes, mean=tuple(mean), std=tuple(std),
                        blocks_per_stage=IMAGENET_STAGE_SIZES[depth], width=width,
                        channels=tuple(channels))


for _depth in IMAGENET_STAGE_SIZES:
  MODELS.register(f"resnet{_depth}")(functools.partial(build_resnet_imagenet, depth=_depth))

"""Distribution shift: common image corruptions (Hendrycks & Dietterich 2019, CIFAR-10-C).

`corrupt(key, images, name, severity)` applies one registered corruption (`CORRUPTIONS`) at
severity 1..5 to a float32 [B, H, W, C] batch in [0, 1]; `corrupt_dataset` streams a numpy array
through it in fixed-size batches with results independent of the batch size; and
`save_preview_grid` writes a PNG of every corruption at every severity for eyeballing.
"""
from __future__ import annotations

from adcorda_jax.shift.blur import pixelate_to
from adcorda_jax.shift.common import (
    SEVERITIES,
    CorruptionFn,
    example_keys,
    spatial_scale,
)
from adcorda_jax.shift.corruptions import (
    COLOR_ONLY,
    CORRUPTIONS,
    NOISE_CORRUPTIONS,
    compiled,
    corrupt,
    corrupt_dataset,
    corruption_names,
)
from adcorda_jax.shift.jpeg import jpeg_roundtrip
from adcorda_jax.shift.preview import save_preview_grid

__all__ = ["COLOR_ONLY", "CORRUPTIONS", "NOISE_CORRUPTIONS", "SEVERITIES", "CorruptionFn",
           "compiled", "corrupt", "corrupt_dataset", "corruption_names", "example_keys",
           "jpeg_roundtrip", "pixelate_to", "save_preview_grid", "spatial_scale"]

"""A PNG grid of corrupted examples, to eyeball what each corruption and severity does."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from adcorda_jax.shift.common import SEVERITIES, check_severity
from adcorda_jax.shift.corruptions import check_name, corrupt, corruption_names
from adcorda_jax.workdir import write_atomic

CELL_INCHES = 1.0  # side of one image cell
LABEL_INCHES = 1.4  # left margin for the row labels
TITLE_INCHES = 0.3  # top margin for the column titles
MAX_EXAMPLES = 8


def save_preview_grid(path: str | Path, images: np.ndarray, key: jax.Array,
                      names: Sequence[str] | None = None,
                      severities: Sequence[int] = SEVERITIES) -> None:
  """Writes a PNG: one row per (corruption, example), columns clean then each severity.

  `images` is [N, H, W, C] in [0, 1] with N <= 8; `names` defaults to every corruption that
  applies to C channels. Written atomically (temporary file, then rename).
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or not 1 <= len(images) <= MAX_EXAMPLES:
    raise ValueError(f"images must be [N, H, W, C] with 1 <= N <= {MAX_EXAMPLES}, "
                     f"got shape {images.shape}")
  names = list(corruption_names(images.shape[-1]) if names is None else names)
  for name in names:
    check_name(name)
  severities = [check_severity(s) for s in severities]
  rows, cols = len(names) * len(images), 1 + len(severities)
  width = LABEL_INCHES + CELL_INCHES * cols
  height = TITLE_INCHES + CELL_INCHES * rows
  figure, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
  figure.subplots_adjust(left=LABEL_INCHES / width, right=1.0, bottom=0.0,
                         top=1.0 - TITLE_INCHES / height, wspace=0.04, hspace=0.04)
  try:
    for i, name in enumerate(names):
      corrupted = [np.asarray(corrupt(key, images, name, s)) for s in severities]
      for j, clean in enumerate(images):
        row = axes[i * len(images) + j]
        for axis, image in zip(row, [clean] + [c[j] for c in corrupted]):
          _show(axis, image)
        row[0].set_ylabel(name if len(images) == 1 else f"{name} #{j}", rotation=0,
                          ha="right", va="center", fontsize=8)
    for axis, title in zip(axes[0], ["clean"] + [f"severity {s}" for s in severities]):
      axis.set_title(title, fontsize=8)
    write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=80), mode="wb")
  finally:
    plt.close(figure)


def _show(axis, image: np.ndarray) -> None:
  """Draws one [H, W, C] image in [0, 1] without ticks (gray colormap for one channel)."""
  if image.shape[-1] == 1:
    axis.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
  else:
    axis.imshow(np.clip(image, 0.0, 1.0), interpolation="nearest")
  axis.set_xticks([])
  axis.set_yticks([])

"""Training-curve plots (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from adcorda_jax.workdir import write_atomic  # pylint: disable=g-import-not-at-top


def save_figure_atomic(figure: Any, path: str | Path) -> None:
  """Saves a matplotlib figure through a temporary file and an atomic rename."""
  path = Path(path)
  try:
    write_atomic(path, lambda f: figure.savefig(f, format=path.suffix.lstrip(".") or "png",
                                                dpi=120, bbox_inches="tight"), mode="wb")
  finally:
    plt.close(figure)


def plot_training_curves(records: Sequence[dict[str, Any]], path: str | Path,
                         title: str = "") -> None:
  """Loss and accuracy against step: training (logged) and validation (per epoch)."""
  train = [r for r in records if "loss" in r]
  val = [r for r in records if "val_accuracy" in r]
  figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
  loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
  if val:
    loss_axis.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
  loss_axis.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
  accuracy_axis.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train")
  if val:
    accuracy_axis.plot([r["step"] for r in val], [r["val_accuracy"] for r in val], "o-",
                       label="val")
  accuracy_axis.set(xlabel="step", ylabel="accuracy", title="accuracy")
  for axis in (loss_axis, accuracy_axis):
    axis.grid(alpha=0.3)
    axis.legend()
  if title:
    figure.suptitle(title)
  save_figure_atomic(figure, path)

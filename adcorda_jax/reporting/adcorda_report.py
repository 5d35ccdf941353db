"""AdCorDA results for people: the comparison table, correction statistics and two plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from adcorda_jax.reporting import plots
from adcorda_jax.attacks.eps import eps_dir_tag, eps_key, eps_label

__all__ = ["adcorda_markdown", "eps_dir_tag", "eps_key", "eps_label", "plot_accuracy",
           "plot_corrections", "summary_line"]

_DESCRIPTIONS = {
    "baseline": "the trained classifier, unchanged",
    "corrected_ce": "fine-tuned on the corrected set, cross-entropy only",
    "same_budget_finetune": "fine-tuned on the original set, same optimizer, schedule and steps",
    "adcorda": "fine-tuned on the corrected set (source) aligned to the original set (target)",
}


def _percent(value: float | None, std: float | None = None) -> str:
  if value is None:
    return "n/a"
  text = f"{100 * value:.2f}%"
  return text + (f" ± {100 * std:.2f}" if std is not None else "")


def _number(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4g}"


def _robust_columns(results: dict[str, Any]) -> list[tuple[str, float]]:
  return [(attack, eps) for attack in results["evaluate"]["attacks"]
          for eps in results["evaluate"]["eps"]]


def summary_line(results: dict[str, Any]) -> str:
  """`baseline 0.9443, corrected_ce 0.9513 ± 0.0021, ...` (test accuracy, mean ± std)."""
  parts = []
  for name in results["variant_order"]:
    variant = results["variants"][name]
    std = variant["test_accuracy_std"]
    parts.append(f"{name} {variant['test_accuracy']:.4f}" + (f" ± {std:.4f}" if std else ""))
  return "test accuracy: " + ", ".join(parts)


def adcorda_markdown(results: dict[str, Any]) -> str:
  """The variant comparison table, the correction statistics and the run's settings."""
  columns = _robust_columns(results)
  seeds = results["seeds"]
  lines = [
      f"# AdCorDA: {results['model']} on {results['dataset']}",
      "",
      f"Mean ± sample std over seeds {seeds} for the fine-tuned variants (the baseline is one "
      f"model). Robust accuracy on the first {results['evaluate']['robust_examples']} test "
      f"examples, {results['evaluate']['norm']} attacks.",
      "",
      "| variant | test | train | val | fixed train errors | "
      + " | ".join(f"{a} {eps_label(e)}" for a, e in columns) + " |",
      "|---|" + "---:|" * (4 + len(columns)),
  ]
  for name in results["variant_order"]:
    v = results["variants"][name]
    several = v["runs"] > 1  # The baseline is one model: no spread to show.
    cells = [_percent(v[key], v[f"{key}_std"] if several else None) for key in (
        "test_accuracy", "train_accuracy", "val_accuracy", "misclassified_fixed")]
    cells += [_percent(v["robust_accuracy"][a][eps_key(e)],
                       v["robust_accuracy_std"][a][eps_key(e)] if several else None)
              for a, e in columns]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "*fixed train errors*: accuracy on the training images the baseline got wrong.", ""]
  quant = results.get("quantization")
  if quant:
    grid = "per-channel" if quant["per_channel"] else "per-tensor"
    kind = "symmetric" if quant["symmetric"] else "asymmetric"
    names = ", ".join(f"`{name}` = {entry['same_as']}" for name, entry in quant["variants"].items())
    lines += [f"Weight-quantized network: {quant['weight_bits']}-bit {grid} {kind} kernels "
              f"({quant['size_bytes']:,} bytes vs {quant['float_size_bytes']:,} in float32). The "
              f"baseline is its post-training quantization ({quant['calibration']} calibration); "
              "every fine-tuning runs with fake quantization in the loop, so "
              f"`same_budget_finetune` is the QAT control. Names: {names}.", ""]
  lines += [f"- `{name}`: {_DESCRIPTIONS[name]}" for name in results["variant_order"]]
  c = results["correction"]
  histogram = c["steps_histogram"]
  edges = histogram["bin_edges"]
  bins = ", ".join(
      (f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}") + f": {n}"
      for lo, hi, n in zip(edges[:-1], edges[1:], histogram["counts"], strict=True) if n)
  lines += [
      "",
      "## Correction (stage 1)",
      "",
      f"Attack: {c['attack']}, eps {eps_label(c['eps'])}, failures: `{c['on_failure']}`.",
      "",
      "| training images | misclassified | corrected | failed | success rate | replaced | "
      "dropped | mean norm | max norm |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
      f"| {c['num_train']} | {c['misclassified']} | {c['corrected']} | {c['failed']} | "
      f"{_percent(c['success_rate'])} | {c['replaced']} | {c['dropped']} | "
      f"{_number(c['mean_perturbation_norm'])} | {_number(c['max_perturbation_norm'])} |",
      "",
      f"Gradient steps used (steps: images; failures use all): {bins or 'none'}.",
      "",
      "## Settings",
      "",
      f"- Fine-tuning: {results['adapt']['steps']} steps ({results['adapt']['steps_per_epoch']}"
      f"/epoch of the corrected set), alignment `{results['adapt']['alignment']}` with lambda "
      f"{results['adapt']['lambda_']:g}, BatchNorm `{results['adapt']['batch_norm']}`, "
      f"trainable `{results['adapt']['trainable'] or '(all)'}`",
      _method_line(results["adapt"]),
      "- Attacks: " + "; ".join(f"`{k}`: {d}" for k, d in
                                results["evaluate"]["attack_descriptions"].items()),
      f"- Baseline: `{results['baseline_checkpoint']}`; data: {results['data_source']}",
      f"- {results['devices']} {results['backend']} device(s), this call "
      f"{results['wall_seconds']:.1f} s; plots: `accuracy.png`, `corrections.png`",
      "",
  ]
  return "\n".join(lines)


def _method_line(adapt: dict[str, Any]) -> str:
  """The reading of the method the `adcorda` variant ran (older results: the paper's)."""
  direction, source = adapt.get("direction", "forward"), adapt.get("source", "corrected_set")
  start = adapt.get("start", "baseline")
  sets = ("corrected images only" if source == "corrected_subset" else "corrected set",
          "original set")
  labelled, aligned = sets if direction == "forward" else sets[::-1]
  steps = adapt.get("steps_by_variant", {})
  budget = (f"; starts from corrected_ce, so it and same_budget_finetune train "
            f"{steps.get('adcorda', 2 * adapt['steps'])} steps" if start == "corrected_ce" else "")
  return (f"- AdCorDA variant: labelled source = {labelled}, aligned target = {aligned} "
          f"(`adapt.direction={direction}`, `adapt.source={source}`, `adapt.start={start}`)"
          f"{budget}")


def plot_accuracy(results: dict[str, Any], path: str | Path) -> None:
  """Bars per variant with std error bars: clean test accuracy, then each robust accuracy."""
  names = results["variant_order"]
  variants = results["variants"]
  groups = [("test (clean)", [variants[n]["test_accuracy"] for n in names],
             [variants[n]["test_accuracy_std"] for n in names])]
  for attack, eps in _robust_columns(results):
    key = eps_key(eps)
    groups.append((f"{attack} {eps_label(eps)}",
                   [variants[n]["robust_accuracy"][attack][key] for n in names],
                   [variants[n]["robust_accuracy_std"][attack][key] for n in names]))
  figure, axes = plots.plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 1, 3.8),
                                    squeeze=False)
  colors = plots.plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for axis, (title, means, stds) in zip(axes[0], groups, strict=True):
    xs = np.arange(len(names))
    axis.bar(xs, means, yerr=stds, capsize=4, color=colors[:len(names)])
    low = min(means) - 2 * max(max(stds), 0.005)
    axis.set(xticks=xs, title=title, ylim=(max(0.0, low - 0.02), min(1.0, max(means) + 0.03)))
    axis.set_xticklabels(names, rotation=30, ha="right")
    axis.grid(axis="y", alpha=0.3)
  axes[0][0].set_ylabel("accuracy")
  figure.suptitle(f"AdCorDA: {results['model']} on {results['dataset']} "
                  f"(mean ± std over seeds {results['seeds']})", y=1.03)
  plots.save_figure_atomic(figure, path)


def _show(axis: Any, image: np.ndarray) -> None:
  if image.shape[-1] == 1:
    axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
  else:
    axis.imshow(np.clip(image, 0, 1))
  axis.set_xticks([])
  axis.set_yticks([])


def plot_corrections(original: np.ndarray, corrected: np.ndarray, labels: np.ndarray,
                     predictions: np.ndarray, eps: float, path: str | Path) -> None:
  """Rows: original (with the baseline's wrong prediction), corrected, magnified perturbation.

  The perturbation is shown around grey, scaled so the largest shown |delta| (at most eps for
  linf) reaches black or white.
  """
  count = len(original)
  deltas = corrected.astype(np.float32) - original.astype(np.float32)
  scale = float(np.abs(deltas).max()) or eps
  figure, axes = plots.plt.subplots(3, count, figsize=(1.3 * count + 0.6, 4.4), squeeze=False)
  for column in range(count):
    delta = deltas[column]
    _show(axes[0][column], original[column])
    axes[0][column].set_title(f"y={labels[column]} pred={predictions[column]}", fontsize=7)
    _show(axes[1][column], corrected[column])
    _show(axes[2][column], np.clip(0.5 + delta / (2 * scale), 0, 1))
    axes[2][column].set_title(f"max |d|={np.abs(delta).max():.3f}", fontsize=7)
  for row, name in enumerate(("original", "corrected", "perturbation")):
    axes[row][0].set_ylabel(name, fontsize=8)
  figure.suptitle(f"Corrected training images (eps {eps_label(eps)}; perturbation magnified "
                  f"{1 / (2 * scale):.3g}x around grey)", fontsize=9)
  plots.save_figure_atomic(figure, path)

"""Markdown summaries of finished runs."""
from __future__ import annotations

from typing import Any


def _percent(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:.2f}%"


def training_report(results: dict[str, Any]) -> str:
  """A short human summary of a `task=train` run."""
  config = results["config"]
  train = config["train"]
  lines = [
      f"# Training: {results['model']} on {results['dataset']}",
      "",
      "| split | examples | accuracy | loss |",
      "|---|---:|---:|---:|",
  ]
  for split in ("train", "val", "test"):
    lines.append(f"| {split} | {results[f'{split}_examples']} | "
                 f"{_percent(results[f'{split}_accuracy'])} | "
                 f"{_fmt(results[f'{split}_loss'])} |")
  lines += [
      "",
      f"- Model: `{results['model']}` (width {config['model'].get('width', 1.0)}), "
      f"{results['params']:,} parameters",
      f"- Training: {results['steps']} steps = {train['epochs']} epochs of batch "
      f"{train['batch_size']}, optimizer `{train['optimizer']}`, learning rate "
      f"{train['learning_rate']} ({train['schedule']} schedule)",
      f"- Throughput: {results['examples_per_second']:.0f} examples/s on "
      f"{results['devices']} {results['backend']} device(s); whole run "
      f"{results['wall_seconds']:.1f} s" +
      (f" (resumed at step {results['resumed_from_step']})" if results["resumed_from_step"] else ""),
      f"- Checkpoint: `{results['checkpoint']}`",
      "- Curves: `training_curves.png`; per-step metrics: `metrics.jsonl`",
      "",
  ]
  return "\n".join(lines)


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.4f}"

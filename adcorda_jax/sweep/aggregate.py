"""Aggregating a sweep: per-cell metrics, means and seed spread, paired differences with 95% CIs.

Each finished cell's `results.json` becomes rows (variant, run seed, metrics) through its task's
reader. Cells that differ only in the sweep's seed key form one *group*; a *unit* of a group is one
(cell seed, run seed) pair, e.g. task=adcorda's `adcorda.seeds` inside each `seed` cell. A variant
with one value per cell (adcorda's baseline) counts for every run seed of that cell.

A comparison `a - b` is paired: the difference is taken within each unit that has both, and its
95% interval is Student's t over those differences (mean +- t(0.975, n-1) * sd / sqrt(n)). The
verdict says whether the interval lies above zero, below it, or contains it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy import stats

from adcorda_jax.errors import ConfigError
from adcorda_jax.sweep.plan import Comparison

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Row:
  """One evaluated model of a cell. `run_seed` None: the same model for every run seed."""
  variant: str
  run_seed: int | None
  metrics: dict[str, float]


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _evaluation_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
  """Clean accuracies and `robust.<attack>@<eps>` of one evaluation (`evaluate.Evaluator`)."""
  metrics = {key: float(evaluation[key]) for key in ("test_accuracy", "val_accuracy",
                                                      "train_accuracy")
             if _number(evaluation.get(key))}
  for attack, by_eps in (evaluation.get("robust_accuracy") or {}).items():
    for eps, value in by_eps.items():
      if _number(value):
        metrics[f"robust.{attack}@{float(eps):.4g}"] = float(value)
  return metrics


def adcorda_rows(results: dict[str, Any]) -> list[Row]:
  """task=adcorda: every variant, per fine-tuning seed (the baseline once)."""
  rows = []
  for variant in results.get("variant_order", results["variants"]):
    for run in results["variants"][variant]["per_seed"]:
      rows.append(Row(variant, run.get("seed"), _evaluation_metrics(run)))
  return rows


def train_rows(results: dict[str, Any]) -> list[Row]:
  """task=train: the trained model."""
  return [Row("train", None, _evaluation_metrics(results))]


def generic_rows(results: dict[str, Any]) -> list[Row]:
  """Any other task: its top-level numbers, as one variant named after the task."""
  metrics = {k: float(v) for k, v in results.items()
             if _number(v) and k not in ("format_version", "devices", "wall_seconds")}
  return [Row(str(results.get("task", "run")), None, metrics)]


READERS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "adcorda": adcorda_rows, "train": train_rows}


def cell_rows(results: dict[str, Any]) -> list[Row]:
  return READERS.get(results.get("task", ""), generic_rows)(results)


def selected_metrics(available: Iterable[str], requested: Sequence[str]) -> list[str]:
  """The available metric names each requested name matches: itself, or `name.` prefixed
  (`robust` is every `robust.<attack>@<eps>`), in requested order."""
  available = sorted(set(available))
  chosen: list[str] = []
  for name in requested:
    for metric in available:
      if (metric == name or metric.startswith(f"{name}.")) and metric not in chosen:
        chosen.append(metric)
  return chosen


def summary(values: Sequence[float]) -> dict[str, Any]:
  """Mean, sample std (ddof=1; 0 for one value) and count."""
  array = np.asarray(values, np.float64)
  return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
          "n": len(array)}


def paired(differences: Sequence[float]) -> dict[str, Any]:
  """Mean paired difference with its 95% t interval and a verdict (interval vs zero)."""
  result = summary(differences)
  n = result["n"]
  if n < 2:
    return {**result, "low": None, "high": None, "verdict": "one seed"}
  half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * result["std"] / math.sqrt(n)
  low, high = result["mean"] - half, result["mean"] + half
  verdict = "higher" if low > 0 else "lower" if high < 0 else "within noise"
  return {**result, "low": low, "high": high, "verdict": verdict}


@dataclasses.dataclass
class Group:
  """The cells of a sweep that differ only in the seed key."""
  name: str
  overrides: dict[str, Any]
  axis_values: dict[str, Any]          # Every axis key's value in these cells (base if unset).
  cells: list[str] = dataclasses.field(default_factory=list)
  units: dict[tuple[Any, Any], dict[str, dict[str, float]]] = dataclasses.field(
      default_factory=dict)            # (cell seed, run seed) -> variant -> metrics.

  def add(self, cell_seed: Any, rows: list[Row]) -> None:
    run_seeds = sorted({r.run_seed for r in rows if r.run_seed is not None}) or [None]
    for row in rows:
      for run_seed in ([row.run_seed] if row.run_seed is not None else run_seeds):
        self.units.setdefault((cell_seed, run_seed), {})[row.variant] = row.metrics


def aggregate_groups(groups: Sequence[Group], comparisons: Sequence[Comparison],
                     requested_metrics: Sequence[str]) -> dict[str, Any]:
  """{"metrics": [...], "variants": [...], "groups": [...]}: the sweep's tables as data."""
  available = {m for g in groups for unit in g.units.values() for row in unit.values()
               for m in row}
  metrics = selected_metrics(available, requested_metrics)
  variants = list(dict.fromkeys(v for g in groups for unit in g.units.values() for v in unit))
  unknown = sorted({name for c in comparisons for name in (c.minuend, c.subtrahend)
                    if variants and name not in variants})
  if unknown:
    raise ConfigError(f"sweep.compare names {', '.join(map(repr, unknown))}, which no finished "
                      f"cell has; its variants: {', '.join(variants)}")
  entries = []
  for group in groups:
    entry: dict[str, Any] = {"name": group.name, "overrides": group.overrides,
                             "axis_values": group.axis_values, "cells": group.cells,
                             "units": len(group.units), "variants": {}, "comparisons": {}}
    for variant in variants:
      by_metric = {}
      for metric in metrics:
        values = [u[variant][metric] for u in group.units.values()
                  if metric in u.get(variant, {})]
        if values:
          by_metric[metric] = summary(values)
      if by_metric:
        entry["variants"][variant] = by_metric
    for comparison in comparisons:
      by_metric = {}
      for metric in metrics:
        differences = [u[comparison.minuend][metric] - u[comparison.subtrahend][metric]
                       for u in group.units.values()
                       if metric in u.get(comparison.minuend, {})
                       and metric in u.get(comparison.subtrahend, {})]
        if differences:
          by_metric[metric] = paired(differences)
      entry["comparisons"][comparison.name] = by_metric
    entries.append(entry)
  return {"metrics": metrics, "variants": variants,
          "comparisons": [c.name for c in comparisons], "groups": entries}

"""task=sweep's report.md and map plots: per metric, a table of cells and a plot per axis."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from adcorda_jax.reporting.plots import plt, save_figure_atomic
from adcorda_jax.sweep.axes import value_text

VERDICT_MARK = {"higher": "**higher**", "lower": "**lower**", "within noise": "within noise",
                "one seed": "one seed"}


def _percent(metric: str) -> bool:
  return "accuracy" in metric or metric.startswith("robust.")


def _scale(metric: str) -> float:
  return 100.0 if _percent(metric) else 1.0


def plot_file(metric: str) -> str:
  """The map of paired differences of `metric`."""
  return "map_" + re.sub(r"[^A-Za-z0-9.+-]", "_", metric) + ".png"


def axis_plot_file(metric: str) -> str:
  """The variants' `metric` against each axis."""
  return "by_axis_" + re.sub(r"[^A-Za-z0-9.+-]", "_", metric) + ".png"


def _mean_std(entry: dict[str, Any] | None, scale: float) -> str:
  if not entry:
    return "-"
  if entry["n"] < 2:
    return f"{scale * entry['mean']:.2f}"
  return f"{scale * entry['mean']:.2f} ± {scale * entry['std']:.2f}"


def _signed(value: float) -> str:
  """`+1.23`; a float-rounding residue prints as +0.00, never -0.00."""
  return f"{value if abs(value) >= 0.005 else 0.0:+.2f}"


def _difference(entry: dict[str, Any] | None, scale: float) -> str:
  if not entry:
    return "-"
  text = _signed(scale * entry["mean"])
  if entry["low"] is not None:
    text += f" [{_signed(scale * entry['low'])}, {_signed(scale * entry['high'])}]"
  return f"{text} {VERDICT_MARK[entry['verdict']]}"


def metric_table(results: dict[str, Any], metric: str) -> list[str]:
  """Markdown rows: cell, units, each variant's mean ± std, each paired difference [95% CI]."""
  scale = _scale(metric)
  variants, comparisons = results["variants"], results["comparisons"]
  header = ["cell", "seeds"] + variants + comparisons
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
  for group in results["groups"]:
    cells = [f"`{group['name']}`", str(group["units"])]
    cells += [_mean_std(group["variants"].get(v, {}).get(metric), scale) for v in variants]
    cells += [_difference(group["comparisons"].get(c, {}).get(metric), scale)
              for c in comparisons]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def map_table(results: dict[str, Any]) -> list[str]:
  """Markdown rows: cell x (metric, comparison) paired differences with their 95% intervals."""
  columns = [(m, c) for m in results["metrics"] for c in results["comparisons"]]
  header = ["cell", "seeds"] + [f"{c}: {m}" for m, c in columns]
  lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(columns)]
  for group in results["groups"]:
    cells = [f"`{group['name']}`", str(group["units"])]
    cells += [_difference(group["comparisons"].get(c, {}).get(m), _scale(m)) for m, c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def sweep_markdown(results: dict[str, Any]) -> str:
  """The report: how to read it, one section per metric, then the cells and their status."""
  wall = results["runs_wall_seconds"]
  lines = [
      f"# Sweep of task={results['base_task']}: {results['cells_complete']}/"
      f"{results['cells_total']} cells", "",
      f"Axes: {', '.join(f'`{a}`' for a in results['axes']) or '(none)'}; seed key "
      f"`{results['seed_key']}`. A row is one cell over its seeds; accuracies in %.",
      "Variants: mean ± sample std over the seeds (units: cell seed x run seed). Differences "
      "are paired by seed, with 95% Student-t intervals; **higher**/**lower** when the interval "
      "excludes 0.", "",
      f"Runs' recorded wall time: {wall / 60:.1f} min (sum over baselines and cells, last call "
      "of each); this sweep call "
      f"{results['wall_seconds']:.1f} s.", ""]
  if results["comparisons"] and results["groups"]:
    lines += ["## Map: paired differences (points), 95% intervals", ""] + map_table(results) + [""]
  for metric in results["metrics"]:
    lines += [f"## {metric}", ""]
    if results["comparisons"]:
      lines += [f"![{metric} differences]({plot_file(metric)})", ""]
    lines += [f"![{metric} by axis]({axis_plot_file(metric)})", ""]
    lines += metric_table(results, metric) + [""]
  lines += ["## Runs", "", "| run | kind | status | wall (s) |", "|---|---|---|---:|"]
  for cell in results["cells"]:
    seconds = f"{cell['wall_seconds']:.0f}" if cell["wall_seconds"] is not None else "-"
    lines.append(f"| `{cell['name']}` | {cell['kind']} | {cell['status']} | {seconds} |")
  return "\n".join(lines + [""])


def _sort_values(values: list[Any]) -> list[Any]:
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
  return sorted(values) if numeric else values


def axis_series(groups: list[dict[str, Any]], axis: str, axes: list[str]
                ) -> list[tuple[str, list[dict[str, Any]]]]:
  """Groups that differ only in `axis`, as (label of the other axes' values, groups) with at
  least two values of `axis`: a one-at-a-time map gives one series per axis."""
  series: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
  for group in groups:
    others = tuple((k, value_text(group["axis_values"].get(k))) for k in axes if k != axis)
    series.setdefault(others, []).append(group)
  out = []
  for others, members in series.items():
    if len({value_text(g["axis_values"].get(axis)) for g in members}) >= 2:
      out.append((", ".join(f"{k}={v}" for k, v in others), members))
  return out


def _series_points(members: list[dict[str, Any]], axis: str
                   ) -> tuple[list[str], dict[str, dict[str, Any]]]:
  """The x labels of a series in axis order, and its group per label."""
  if axis == "cell":
    return [g["name"] for g in members], {g["name"]: g for g in members}
  by_value = {value_text(g["axis_values"].get(axis)): g for g in members}
  raw = {value_text(g["axis_values"].get(axis)): g["axis_values"].get(axis) for g in members}
  return [value_text(v) for v in _sort_values(list(raw.values()))], by_value


def plot_metric_map(results: dict[str, Any], metric: str, path: Path) -> None:
  """A row per comparison, a panel per axis: the paired difference (95% CI) against the axis
  value, one line per set of the other axes' values (one line in a one-at-a-time map)."""
  scale, panels, comparisons = _scale(metric), _panels(results), results["comparisons"]
  figure, grid = plt.subplots(len(comparisons), len(panels), squeeze=False, sharey="row",
                              figsize=(2.8 * len(panels) + 0.6, 2.6 * len(comparisons)))
  for row, comparison in enumerate(comparisons):
    for column, (axis, series) in enumerate(panels):
      panel = grid[row][column]
      for series_index, (label, members) in enumerate(series[:4]):
        values, by_value = _series_points(members, axis)
        xs, ys, low, high = [], [], [], []
        for position, value in enumerate(values):
          entry = by_value[value]["comparisons"].get(comparison, {}).get(metric)
          if entry is None:
            continue
          xs.append(position + 0.06 * series_index)
          ys.append(scale * entry["mean"])
          low.append(scale * (entry["mean"] - entry["low"]) if entry["low"] is not None else 0)
          high.append(scale * (entry["high"] - entry["mean"]) if entry["high"] is not None else 0)
        panel.errorbar(xs, ys, yerr=[low, high], fmt="o-", capsize=3, color=f"C{series_index}",
                       label=label or None)
        panel.set_xticks(range(len(values)), values, fontsize=7,
                         rotation=30 if axis == "cell" else 0)
      panel.axhline(0.0, color="black", linewidth=0.8)
      panel.grid(alpha=0.3)
      if row == len(comparisons) - 1:
        panel.set_xlabel(axis, fontsize=8)
      if column == 0:
        panel.set_ylabel(f"{comparison}\n{'(points)' if _percent(metric) else ''}", fontsize=8)
      if len(series) > 1 and row == 0:
        panel.legend(fontsize=6)
  figure.suptitle(f"{metric}: paired differences by seed, 95% intervals")
  figure.tight_layout()
  save_figure_atomic(figure, path)


def _panels(results: dict[str, Any]) -> list[tuple[str, list[tuple[str, list[dict[str, Any]]]]]]:
  """(axis, series) per axis with a series of two or more values, else one panel of all cells."""
  axes, groups = results["axes"], results["groups"]
  panels = [(axis, axis_series(groups, axis, axes)) for axis in axes]
  return [(a, s) for a, s in panels if s] or [("cell", [("", groups)])]


def plot_metric_by_axis(results: dict[str, Any], metric: str, path: Path) -> None:
  """A panel per axis: each variant's mean (± seed std) against the axis value."""
  scale, panels = _scale(metric), _panels(results)
  columns = min(len(panels), 4)
  rows = -(-len(panels) // columns)
  figure, grid = plt.subplots(rows, columns, squeeze=False, sharey=True,
                              figsize=(3.2 * columns + 0.6, 2.8 * rows))
  for panel in grid.flat[len(panels):]:
    panel.set_visible(False)
  for panel, (axis, series) in zip(grid.flat, panels):
    values, by_value = _series_points(series[0][1], axis)  # The base values' series.
    for index, variant in enumerate(results["variants"]):
      points = [(x, by_value[v]["variants"].get(variant, {}).get(metric))
                for x, v in enumerate(values)]
      points = [(x, e) for x, e in points if e is not None]
      panel.errorbar([x + 0.05 * index for x, _ in points],
                     [scale * e["mean"] for _, e in points],
                     yerr=[scale * e["std"] for _, e in points], fmt="o-", capsize=2,
                     color=f"C{index}", label=variant)
    panel.set_xticks(range(len(values)), values, fontsize=7, rotation=30 if axis == "cell" else 0)
    panel.set_xlabel(axis, fontsize=8)
    panel.grid(alpha=0.3)
  grid[0][0].set_ylabel(f"{metric}{' (%)' if _percent(metric) else ''}", fontsize=8)
  grid[0][0].legend(fontsize=6)
  figure.suptitle(f"{metric} by axis: mean ± std over seeds")
  figure.tight_layout()
  save_figure_atomic(figure, path)


def map_plots(results: dict[str, Any], directory: Path) -> list[Callable[[], None]]:
  """Per metric: the variants against each axis, and the map of paired differences."""
  if not results["groups"]:
    return []
  plots = [lambda m=metric: plot_metric_by_axis(results, m, directory / axis_plot_file(m))
           for metric in results["metrics"]]
  if results["comparisons"]:
    plots += [lambda m=metric: plot_metric_map(results, m, directory / plot_file(m))
              for metric in results["metrics"]]
  return plots

"""Compression-study results for people: tables per network, per corruption, findings, two plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from adcorda_jax.reporting import plots
from adcorda_jax.attacks.eps import eps_key, eps_label
from adcorda_jax.study import findings

_MARKERS = {"filter_pruning": "s", "magnitude_pruning": "^", "distillation": "o", "ptq": "D"}


def _percent(value: float | None, std: float | None = None) -> str:
  if value is None:
    return "n/a"
  return f"{100 * value:.1f}%" + (f" ± {100 * std:.1f}" if std else "")


def _robust_columns(results: dict[str, Any]) -> list[tuple[str, float]]:
  return [(attack, eps) for attack in results["evaluate"]["attacks"]
          for eps in results["evaluate"]["eps"]]


def _rows(results: dict[str, Any], label: str) -> list[dict[str, Any]]:
  """The original network, then its cells, as uniform rows."""
  original = {**results["networks"][label], "method": "original", "name": "original"}
  return [original] + [c for c in results["cells"] if c["network"] == label]


def summary_line(results: dict[str, Any]) -> str:
  held = {True: "held", False: "not held", None: "untested"}
  return ", ".join(
      f"finding {f['finding']} {held[f['held']]}"
      + (f" (adversarial: {held[f['adversarial']['held']]})" if "adversarial" in f else "")
      for f in results["findings"])


def study_markdown(results: dict[str, Any]) -> str:
  """Per-network tables (size, clean, shift, adversarial), per-corruption accuracy, findings."""
  columns = _robust_columns(results)
  domains = results["shift"]["domains"]
  lines = [
      f"# Compression study: {results['dataset']}",
      "",
      f"Shift: {len(results['shift']['corruptions'])} corruptions x severities "
      f"{results['shift']['severities']} on the first {results['shift']['corrupted_examples']} "
      f"test images" + (f", domains {', '.join(domains)}" if domains else "") + ". Adversarial: "
      f"{results['evaluate']['norm']} attacks on the first "
      f"{results['evaluate']['robust_examples']} test images. Seeds {results['seeds']} (mean ± "
      "std where several). *rel. shift* = shifted accuracy / clean accuracy.",
      "",
      "## Findings (arXiv 2401.12014)",
      "",
  ]
  verdict = {True: "**held**", False: "**not held**", None: "untested"}
  lines += ["| finding | distribution shift | adversarial |", "|---|---|---|"]
  for f in results["findings"]:
    adversarial = f.get("adversarial")
    lines.append(f"| {f['finding']}. {f['statement']} | {verdict[f['held']]}: {f['evidence']} | "
                 + (f"{verdict[adversarial['held']]}: {adversarial['evidence']}"
                    if adversarial else "n/a") + " |")
  for label, network in results["networks"].items():
    lines += ["", f"## {label}: {network['name']} (width {network['width']:g})", "",
              "| cell | params | MFLOPs | bytes | compression | clean | corruptions | "
              + "".join(f"{d} | " for d in domains) + "rel. shift | "
              + " | ".join(f"{a} {eps_label(e)}" for a, e in columns) + " |",
              "|---|" + "---:|" * (7 + len(domains) + len(columns))]
    for row in _rows(results, label):
      shift = row["shift"]
      cells = [f"{row['params']:,}", f"{row['flops'] / 1e6:.2f}", f"{row['size_bytes']:,}",
               f"{row['compression_ratio']:.1f}x",
               _percent(row["test_accuracy"], row.get("test_accuracy_std")),
               _percent(shift["corruption_mean"], shift.get("corruption_mean_std"))]
      cells += [_percent(shift["domains"][d]) for d in domains]
      spread = row.get("relative_robustness_std") or 0.0
      cells += [f"{row['relative_robustness']:.3f}" + (f" ± {spread:.3f}" if spread else "")]
      cells += [_percent(row["robust_accuracy"][a][eps_key(e)]) for a, e in columns]
      lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
  corruptions = results["shift"]["corruptions"]
  lines += ["", "## Accuracy per corruption (mean over severities)", "",
            "| network | cell | " + " | ".join(corruptions) + " |",
            "|---|---|" + "---:|" * len(corruptions)]
  for label in results["networks"]:
    for row in _rows(results, label):
      per = row["shift"]["per_corruption"]
      lines.append(f"| {label} | {row['name']} | "
                   + " | ".join(f"{100 * per[c]:.1f}" for c in corruptions) + " |")
  cell_seconds = sum(row.get("seconds", 0.0) for row in results["cells"])
  lines += ["", f"{results['devices']} {results['backend']} device(s); this call "
            f"{results['wall_seconds']:.0f} s, compressing and evaluating the cells "
            f"{cell_seconds:.0f} s over all calls. Plots: `accuracy_vs_compression.png`, "
            "`large_vs_small.png`" + (", `corruptions.png`" if results.get("preview") else "")
            + ".", ""]
  return "\n".join(lines)


def plot_accuracy_vs_compression(results: dict[str, Any], path: str | Path) -> None:
  """One panel per shift type (clean, corruptions, domains, attacks): accuracy vs compression."""
  panels: list[tuple[str, Any]] = [
      ("clean", lambda r: r["test_accuracy"]),
      ("corruptions (mean)", lambda r: r["shift"]["corruption_mean"])]
  panels += [(f"domain {d}", lambda r, d=d: r["shift"]["domains"][d])
             for d in results["shift"]["domains"]]
  panels += [(f"{a} {eps_label(e)}", lambda r, a=a, e=e: r["robust_accuracy"][a][eps_key(e)])
             for a, e in _robust_columns(results)]
  figure, axes = plots.plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6),
                                    squeeze=False)
  styles = ("-", "--", ":", "-.")
  colors = plots.plt.rcParams["axes.prop_cycle"].by_key()["color"]
  methods = sorted({c["method"] for c in results["cells"]})
  for axis, (title, value) in zip(axes[0], panels, strict=True):
    for n, label in enumerate(results["networks"]):
      original = results["networks"][label]
      for m, method in enumerate(methods):
        rows = sorted((c for c in results["cells"]
                       if c["network"] == label and c["method"] == method),
                      key=lambda c: c["compression_ratio"])
        xs = [1.0] + [c["compression_ratio"] for c in rows]
        ys = [value(original)] + [value(c) for c in rows]
        axis.plot(xs, ys, linestyle=styles[n % len(styles)], marker=_MARKERS.get(method, "o"),
                  color=colors[m % len(colors)],
                  label=f"{label}: {method}" if title == "clean" else None)
    axis.set_xscale("log", base=2)
    axis.set(title=title, xlabel="compression (x fewer bytes)")
    axis.grid(alpha=0.3)
  axes[0][0].set_ylabel("accuracy")
  rows = -(-len(methods) * len(results["networks"]) // 4)  # Legend rows, 4 entries each.
  figure.tight_layout(rect=(0, 0.06 * rows, 1, 1))
  figure.legend(loc="lower center", ncol=min(4, len(methods) * len(results["networks"])),
                bbox_to_anchor=(0.5, 0.0), fontsize=8)
  plots.save_figure_atomic(figure, path)


def plot_large_vs_small(results: dict[str, Any], path: str | Path) -> None:
  """Relative robustness per method (mean over rates), bars per network: one panel for
  distribution shift, one for the strongest attack at the largest eps."""
  panels = [("relative robustness to distribution shift", "shifted / clean accuracy",
             findings.relative_robustness)]
  if results["evaluate"]["eps"]:
    attack, eps = results["evaluate"]["attacks"][-1], max(results["evaluate"]["eps"])
    panels.append((f"relative robustness under {attack} {eps_label(eps)}",
                   "robust / clean accuracy", findings.relative_robust_accuracy(attack, eps)))
  labels = list(results["networks"])
  methods = ["original"] + sorted({c["method"] for c in results["cells"]})
  figure, axes = plots.plt.subplots(
      1, len(panels), figsize=(len(panels) * (1.4 * len(methods) * len(labels) / 2 + 3), 3.8),
      squeeze=False)
  width = 0.8 / len(labels)
  xs = np.arange(len(methods))
  for axis, (title, ylabel, measure) in zip(axes[0], panels, strict=True):
    for n, label in enumerate(labels):
      values = []
      for method in methods:
        if method == "original":
          values.append(measure(results["networks"][label]))
          continue
        rows = [measure(c) for c in results["cells"]
                if c["network"] == label and c["method"] == method]
        values.append(float(np.mean(rows)) if rows else np.nan)
      axis.bar(xs + (n - (len(labels) - 1) / 2) * width, values, width,
               label=f"{label} ({results['networks'][label]['params']:,} params)")
    every = [measure(c) for c in results["cells"]]
    every += [measure(network) for network in results["networks"].values()]
    axis.set(xticks=xs, ylabel=ylabel, title=f"{title} (mean over rates)",
             ylim=(max(0.0, min(every) - 0.05), min(1.05, max(every) + 0.05)))
    axis.set_xticklabels(methods, rotation=20, ha="right")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8)
  figure.tight_layout()
  plots.save_figure_atomic(figure, path)

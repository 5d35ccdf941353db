"""`task=quantize` results for people: the variant table with sizes, and accuracy against bits."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from adcorda_jax.reporting import plots
from adcorda_jax.attacks.eps import eps_key, eps_label


def _percent(value: float | None, std: float | None = None) -> str:
  if value is None:
    return "n/a"
  return f"{100 * value:.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")


def summary_line(results: dict[str, Any]) -> str:
  return "test accuracy: " + ", ".join(
      f"{name} {results['variants'][name]['test_accuracy']:.4f}"
      for name in results["variant_order"])


def quantize_markdown(results: dict[str, Any]) -> str:
  """The float / PTQ / QAT table (accuracy, robust accuracy, bytes) and the run's settings."""
  columns = [(attack, eps) for attack in results["evaluate"]["attacks"]
             for eps in results["evaluate"]["eps"]]
  q = results["quantization"]
  lines = [
      f"# Quantization: {results['model']} on {results['dataset']}",
      "",
      f"Weights: {'symmetric' if q['symmetric'] else 'asymmetric'} grids, PTQ calibration "
      f"`{q['calibration']}`, BatchNorm folded: {q['fold_batch_norm']}; activations: "
      + (f"{q['activation_bits']}-bit (attacks use `{q['attack_gradient']}` gradients)"
         if q["activation_bits"] else "float") + f". QAT: mean ± std over seeds "
      f"{results['seeds']}. Robust accuracy on the first {results['evaluate']['robust_examples']}"
      f" test images, {results['evaluate']['norm']} attacks.",
      "",
      "| variant | test | "
      + "".join(f"{a} {eps_label(e)} | " for a, e in columns)
      + "size (bytes) | vs float32 | exported model test | export = fake quant |",
      "|---|---:|" + "---:|" * len(columns) + "---:|---:|---:|:---:|",
  ]
  for name in results["variant_order"]:
    v = results["variants"][name]
    several = v["runs"] > 1
    cells = [_percent(v["test_accuracy"], v["test_accuracy_std"] if several else None)]
    cells += [_percent(v["robust_accuracy"][a][eps_key(e)],
                       v["robust_accuracy_std"][a][eps_key(e)] if several else None)
              for a, e in columns]
    cells += [f"{v['size_bytes']:,}", f"{v['compression_ratio']:.1f}x",
              _percent(v.get("exported_test_accuracy")),
              {True: "yes", False: "**no**"}.get(v.get("export_matches"), "")]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += [
      "",
      "- `ptq_*`: post-training quantization of the float weights; the integer export "
      "(`exported/*.npz`) is read back and evaluated separately",
      "- `qat_*`: quantization-aware fine-tuning from the float weights, `adapt` optimizer "
      "and budget, min-max grids, straight-through gradients",
      "",
      f"Checkpoint: `{results['baseline_checkpoint']}`; data: {results['data_source']}; "
      f"{results['devices']} {results['backend']} device(s), this call "
      f"{results['wall_seconds']:.1f} s; plot: `accuracy_vs_bits.png`.",
      "",
  ]
  return "\n".join(lines)


def plot_accuracy_vs_bits(results: dict[str, Any], path: str | Path) -> None:
  """Test accuracy against weight bits: one line per PTQ granularity and for QAT, float dashed."""
  variants = results["variants"]
  series: dict[str, list[tuple[int, float, float]]] = {}
  for name in results["variant_order"]:
    v = variants[name]
    if v["kind"] == "float":
      continue
    label = f"PTQ {v['granularity'].replace('_', '-')}" if v["kind"] == "ptq" else "QAT"
    series.setdefault(label, []).append((v["bits"], v["test_accuracy"],
                                         v["test_accuracy_std"] or 0.0))
  figure, axis = plots.plt.subplots(figsize=(5.5, 3.8))
  for label, points in series.items():
    points.sort()
    axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                  marker="o", capsize=3, label=label)
  if "float" in variants:
    axis.axhline(variants["float"]["test_accuracy"], color="gray", linestyle="--",
                 label="float32")
  bits = sorted({v["bits"] for v in variants.values() if v["kind"] != "float"})
  axis.set(xlabel="weight bits", ylabel="test accuracy", xticks=bits,
           title=f"{results['model']} on {results['dataset']}")
  axis.legend()
  plots.save_figure_atomic(figure, path)

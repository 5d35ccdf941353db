"""Robustness results for people: eps labels, a Markdown table and an accuracy-vs-eps plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from adcorda_jax.attacks.eps import eps_dir_tag, eps_key, eps_label, pixel_levels
from adcorda_jax.reporting import plots

__all__ = ["eps_dir_tag", "eps_key", "eps_label", "pixel_levels", "plot_robustness",
           "robustness_markdown"]

def _percent(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:.2f}%"


def _number(value: float | None, digits: int = 4) -> str:
  return "n/a" if value is None else f"{value:.{digits}g}"


def robustness_markdown(results: dict[str, Any]) -> str:
  """A Markdown summary: robust accuracy with rows eps and columns attacks, then the details."""
  attacks = results["attacks"]
  records = results["records"]
  # Per-example worst case over the attacks; only informative with more than one attack.
  worst_case = results.get("worst_case_accuracy") if len(attacks) > 1 else None
  lines = [
      f"# Robustness: {results['model']} on {results['dataset']} ({results['split']} split)",
      "",
      f"Clean accuracy: **{_percent(results['clean_accuracy'])}** on "
      f"{results['num_examples']} examples; robust accuracy under {results['norm']} attacks "
      "(fraction still classified correctly):",
      "",
      "| eps | " + " | ".join(attacks) + (" | all attacks |" if worst_case else " |"),
      "|---|" + "---:|" * (len(attacks) + bool(worst_case)),
  ]
  for eps in results["eps"]:
    cells = [_percent(results["robust_accuracy"][attack].get(eps_key(eps)))
             for attack in attacks]
    if worst_case:
      cells.append(_percent(worst_case.get(eps_key(eps))))
    lines.append(f"| {eps_label(eps)} | " + " | ".join(cells) + " |")
  if worst_case:
    lines += ["", "*all attacks*: fraction of examples that every attack failed on."]
  lines += [
      "",
      "| attack | eps | robust accuracy | success rate | mean norm of broken | mean steps | "
      "seconds |",
      "|---|---|---:|---:|---:|---:|---:|",
  ]
  for record in records:
    lines.append(
        f"| {record['attack']} | {eps_label(record['eps'])} | "
        f"{_percent(record['robust_accuracy'])} | {_percent(record['success_rate'])} | "
        f"{_number(record['mean_perturbation_norm'])} | {record['mean_steps']:.1f} | "
        f"{record['seconds']:.1f} |")
  lines += cascade_markdown(records)
  lines += flags_markdown(results.get("flags"))
  lines += ["", "Attacks:"]
  lines += [f"- `{attack}`: {description}"
            for attack, description in results["attack_descriptions"].items()]
  lines += [
      "",
      f"- Checkpoint: `{results['checkpoint']}`",
      f"- Data: {results['data_source']}",
      f"- {results['devices']} {results['backend']} device(s), whole run "
      f"{results['wall_seconds']:.1f} s; per-example arrays in `attacks/*/arrays.npz`; "
      "plot: `robustness.png`",
      "",
  ]
  return "\n".join(lines)


def cascade_markdown(records: list[dict[str, Any]]) -> list[str]:
  """AutoAttack's cascade per eps: what each attack broke, the accuracy after it, seconds."""
  cascades = [r for r in records if r.get("cascade")]
  if not cascades:
    return []
  lines = ["", "AutoAttack, attack by attack (each on the points still robust):", "",
           "| eps | attack | attacked | broken | robust accuracy after | seconds |",
           "|---|---|---:|---:|---:|---:|"]
  for record in cascades:
    for step in record["cascade"]:
      lines.append(f"| {eps_label(record['eps'])} | {step['attack']} | {step['attacked']} | "
                   f"{step['broken']} | {_percent(step['robust_accuracy'])} | "
                   f"{step['seconds']:.1f} |")
  return lines


def flags_markdown(flags: dict[str, Any] | None) -> list[str]:
  """AutoAttack's sanity checks as a short list, warnings first."""
  if not flags:
    return []
  lines = ["", f"Sanity checks (on {flags['checked_examples']} points):", ""]
  lines += [f"- **Warning**: {warning}." for warning in flags["warnings"]]
  lines += [f"- probability-like outputs: {'yes' if flags['probability_outputs'] else 'no'}; "
            f"randomized: {'yes' if flags['randomized'] else 'no'}; all-zero input gradients: "
            f"{flags['zero_gradient_fraction']:.1%} of points"]
  if flags.get("square_gain"):
    gains = ", ".join(f"{k}: {100 * v:.2f}%" for k, v in flags["square_gain"].items())
    lines.append(f"- points only Square broke, by eps: {gains}")
  return lines


def plot_robustness(results: dict[str, Any], path: str | Path) -> None:
  """Robust accuracy against eps, one line per attack, the clean accuracy dashed."""
  eps: Sequence[float] = results["eps"]
  in_levels = all(pixel_levels(e) is not None for e in eps)
  xs = [e * 255 for e in eps] if in_levels else list(eps)
  figure, axis = plots.plt.subplots(figsize=(5.5, 3.8))
  for attack in results["attacks"]:
    by_eps = results["robust_accuracy"][attack]
    axis.plot(xs, [by_eps[eps_key(e)] for e in eps], "o-", label=attack)
  axis.axhline(results["clean_accuracy"], color="grey", linestyle="--", label="clean")
  axis.set(xlabel=f"eps ({results['norm']}{', in 1/255' if in_levels else ''})",
           ylabel="robust accuracy", ylim=(-0.02, 1.02),
           title=f"{results['model']} on {results['dataset']} ({results['split']})")
  axis.grid(alpha=0.3)
  axis.legend()
  plots.save_figure_atomic(figure, path)

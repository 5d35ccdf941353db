"""The four findings of arXiv 2401.12014, decided on one study's numbers.

Robustness to distribution shift is measured relative to clean accuracy: relative robustness =
shifted accuracy / clean accuracy, where shifted accuracy is the mean over shift types (the mean
over corruptions and severities, and each extra domain). Each finding is one record
`{finding, statement, held, evidence}`; `held` is None when the grid cannot test it (e.g. one
network only, or a method not run), and `evidence` gives the numbers that decide it.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

STATEMENTS = {
    1: "compressed networks are less robust to distribution shift than their originals",
    2: "larger networks lose more robustness than smaller ones",
    3: "networks from knowledge distillation are more robust than pruned ones",
    4: "8-bit post-training quantization keeps robustness best, beating pruning and distillation",
}
PRUNING = ("filter_pruning", "magnitude_pruning")


def shifted_accuracy(entry: dict[str, Any]) -> float:
  """Mean accuracy over shift types: corruptions (mean over all) and each domain."""
  shift = entry["shift"]
  values = ([shift["corruption_mean"]] if shift["corruption_mean"] is not None else [])
  values += list(shift["domains"].values())
  return float(np.mean(values))


def relative_robustness(entry: dict[str, Any]) -> float:
  return shifted_accuracy(entry) / max(entry["test_accuracy"], 1e-12)


def _mean(values: Sequence[float]) -> float | None:
  return float(np.mean(values)) if len(values) else None


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def decide_findings(originals: dict[str, dict[str, Any]], cells: list[dict[str, Any]],
                    network_order: Sequence[str]) -> list[dict[str, Any]]:
  """The four findings from `originals` (label -> evaluation) and compressed `cells`.

  Each cell dict holds `network`, `method`, `rate` and its (seed-averaged) evaluation fields
  `test_accuracy` and `shift`.
  """
  relative = {label: relative_robustness(entry) for label, entry in originals.items()}
  by_network = {label: [relative_robustness(c) for c in cells if c["network"] == label]
                for label in network_order}

  def method_mean(methods: Sequence[str], rate: float | None = None) -> float | None:
    return _mean([relative_robustness(c) for c in cells if c["method"] in methods
                  and (rate is None or c["rate"] == rate)])

  records = []
  # 1. Compressed below original, for every network.
  parts, verdicts = [], []
  for label in network_order:
    compressed = _mean(by_network[label])
    if compressed is None:
      continue
    below = sum(value < relative[label] for value in by_network[label])
    verdicts.append(compressed < relative[label])
    parts.append(f"{label}: original {_fmt(relative[label])}, compressed mean "
                 f"{_fmt(compressed)} ({below} of {len(by_network[label])} cells below)")
  records.append(_record(1, all(verdicts) if verdicts else None, "; ".join(parts)
                         or "no compressed cells"))

  # 2. The larger network loses relative robustness, and more than the smaller one. A "loss"
  # that is a gain (negative drop) for both networks does not hold the finding.
  if len(network_order) >= 2 and all(by_network[label] for label in network_order[:2]):
    large, small = network_order[0], network_order[1]
    drops = {label: relative[label] - _mean(by_network[label]) for label in (large, small)}
    records.append(_record(2, drops[large] > max(drops[small], 0.0),
                           f"mean drop of relative robustness (positive = lost): {large} "
                           f"{drops[large]:+.3f}, {small} {drops[small]:+.3f}"))
  else:
    records.append(_record(2, None, "needs two networks with compressed cells"))

  # 3. Distillation above pruning.
  kd, pruned = method_mean(("distillation",)), method_mean(PRUNING)
  records.append(_record(
      3, None if kd is None or pruned is None else kd > pruned,
      f"mean relative robustness: distillation {_fmt(kd)}, pruning {_fmt(pruned)}"))

  # 4. 8-bit PTQ above both pruning and distillation.
  ptq8 = method_mean(("ptq",), rate=8.0)
  others = [v for v in (kd, pruned) if v is not None]
  records.append(_record(
      4, None if ptq8 is None or not others else all(ptq8 > v for v in others),
      f"mean relative robustness: ptq 8-bit {_fmt(ptq8)}, pruning {_fmt(pruned)}, "
      f"distillation {_fmt(kd)}"))
  noise = max((c.get("relative_robustness_std") or 0.0 for c in cells), default=0.0)
  if noise > 0:
    for record in records:
      record["evidence"] += (f"; largest seed std of one cell's relative robustness: "
                             f"{noise:.3f}")
  return records


def _record(finding: int, held: bool | None, evidence: str) -> dict[str, Any]:
  return {"finding": finding, "statement": STATEMENTS[finding],
          "held": None if held is None else bool(held), "evidence": evidence}

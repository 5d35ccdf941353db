"""The four findings of arXiv 2401.12014, decided on one study's numbers.

Robustness to distribution shift is measured relative to clean accuracy: relative robustness =
shifted accuracy / clean accuracy, where shifted accuracy is the mean over shift types (the mean
over corruptions and severities, and each extra domain). Each finding is one record
`{finding, statement, held, evidence}`; `held` is None when the grid cannot test it (e.g. one
network only, or a method not run), and `evidence` gives the numbers that decide it. The paper
also attacked its networks, so each record carries the same rule applied to relative adversarial
robustness (robust / clean accuracy) as `adversarial: {held, evidence}`.

Findings 3 and 4 compare groups of methods by the `family` of their registered entry
(`study.methods.COMPRESSION_METHODS`): distillation against pruning, then 8-bit `ptq` against
both. A group the study did not run leaves its findings untested; a method of another family, or
one no longer registered, counts only as "compressed" (findings 1 and 2).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from adcorda_jax.attacks.eps import eps_key, eps_label
from adcorda_jax.study.methods import COMPRESSION_METHODS

STATEMENTS = {
    1: "compressed networks are less robust to distribution shift than their originals",
    2: "larger networks lose more robustness than smaller ones",
    3: "networks from knowledge distillation are more robust than pruned ones",
    4: "8-bit post-training quantization keeps robustness best, beating pruning and distillation",
}


def shifted_accuracy(entry: dict[str, Any]) -> float:
  """Mean accuracy over shift types: corruptions (mean over all) and each domain."""
  shift = entry["shift"]
  values = ([shift["corruption_mean"]] if shift["corruption_mean"] is not None else [])
  values += list(shift["domains"].values())
  return float(np.mean(values))


def relative_robustness(entry: dict[str, Any]) -> float:
  return shifted_accuracy(entry) / max(entry["test_accuracy"], 1e-12)


def family(method: str) -> str | None:
  """The registered family of `method` ("pruning", ...), or None for an unknown method."""
  return COMPRESSION_METHODS.get(method).family if method in COMPRESSION_METHODS else None


def _mean(values: Sequence[float]) -> float | None:
  return float(np.mean(values)) if len(values) else None


def _fmt(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.3f}"


def relative_robust_accuracy(attack: str, eps: float) -> Callable[[dict[str, Any]], float]:
  """The measure `robust accuracy under attack at eps / clean accuracy` of an entry."""
  key = eps_key(eps)

  def measure(entry: dict[str, Any]) -> float:
    return entry["robust_accuracy"][attack][key] / max(entry["test_accuracy"], 1e-12)
  return measure


def decide_findings(originals: dict[str, dict[str, Any]], cells: list[dict[str, Any]],
                    network_order: Sequence[str],
                    adversarial: tuple[str, float] | None = None) -> list[dict[str, Any]]:
  """The four findings from `originals` (label -> evaluation) and compressed `cells`.

  Each cell dict holds `network`, `method`, `rate` and its (seed-averaged) evaluation fields
  `test_accuracy` and `shift`. `held` is decided on relative robustness to distribution shift,
  the paper's measure; with `adversarial=(attack, eps)` each record also carries
  `adversarial: {held, evidence}`, the same rule applied to relative robust accuracy.
  """
  verdicts = _decide(originals, cells, network_order, relative_robustness)
  noise = max((c.get("relative_robustness_std") or 0.0 for c in cells), default=0.0)
  records = []
  for finding, (held, evidence) in enumerate(verdicts, start=1):
    evidence = f"shifted / clean accuracy, {evidence}"
    if noise > 0:
      evidence += f"; largest seed std of one cell's relative robustness: {noise:.3f}"
    records.append(_record(finding, held, evidence))
  if adversarial is not None:
    attack, eps = adversarial
    measure = relative_robust_accuracy(attack, eps)
    for record, (held, evidence) in zip(
        records, _decide(originals, cells, network_order, measure), strict=True):
      evidence = f"{attack} {eps_label(eps)} / clean accuracy, {evidence}"
      record["adversarial"] = {"held": None if held is None else bool(held), "evidence": evidence}
  return records


def _decide(originals: dict[str, dict[str, Any]], cells: list[dict[str, Any]],
            network_order: Sequence[str], measure: Callable[[dict[str, Any]], float]
            ) -> list[tuple[bool | None, str]]:
  """(held, evidence) of each finding, robustness being `measure(entry)`."""
  relative = {label: measure(entry) for label, entry in originals.items()}
  by_network = {label: [measure(c) for c in cells if c["network"] == label]
                for label in network_order}

  def group_mean(member: Callable[[dict[str, Any]], bool]) -> float | None:
    return _mean([measure(c) for c in cells if member(c)])

  verdicts: list[tuple[bool | None, str]] = []
  # 1. Compressed below original, for every network.
  parts, below_original = [], []
  for label in network_order:
    compressed = _mean(by_network[label])
    if compressed is None:
      continue
    below = sum(value < relative[label] for value in by_network[label])
    below_original.append(compressed < relative[label])
    parts.append(f"{label}: original {_fmt(relative[label])}, compressed mean "
                 f"{_fmt(compressed)} ({below} of {len(by_network[label])} cells below)")
  verdicts.append((all(below_original) if below_original else None,
                   "; ".join(parts) or "no compressed cells"))

  # 2. The larger network loses robustness, and more than the smaller one. A "loss" that is a
  # gain (negative drop) for both networks does not hold the finding.
  if len(network_order) >= 2 and all(by_network[label] for label in network_order[:2]):
    large, small = network_order[0], network_order[1]
    drops = {label: relative[label] - _mean(by_network[label]) for label in (large, small)}
    verdicts.append((drops[large] > max(drops[small], 0.0),
                     f"mean drop (positive = lost): {large} {drops[large]:+.3f}, "
                     f"{small} {drops[small]:+.3f}"))
  else:
    verdicts.append((None, "needs two networks with compressed cells"))

  # 3. Distillation above pruning.
  kd = group_mean(lambda c: family(c["method"]) == "distillation")
  pruned = group_mean(lambda c: family(c["method"]) == "pruning")
  verdicts.append((None if kd is None or pruned is None else kd > pruned,
                   f"mean: distillation {_fmt(kd)}, pruning {_fmt(pruned)}"))

  # 4. 8-bit PTQ above both pruning and distillation.
  ptq8 = group_mean(lambda c: c["method"] == "ptq" and c["rate"] == 8.0)
  others = [v for v in (kd, pruned) if v is not None]
  verdicts.append((None if ptq8 is None or not others else all(ptq8 > v for v in others),
                   f"mean: ptq 8-bit {_fmt(ptq8)}, pruning {_fmt(pruned)}, "
                   f"distillation {_fmt(kd)}"))
  return verdicts


def _record(finding: int, held: bool | None, evidence: str) -> dict[str, Any]:
  return {"finding": finding, "statement": STATEMENTS[finding],
          "held": None if held is None else bool(held), "evidence": evidence}

"""Merges the parts of `benchmarks/accelerator_check.sh` into results.json and report.md.

    python benchmarks/accelerator_report.py OUT_DIR [--dry-run 0|1]

Reads what each part left in OUT_DIR (parts.jsonl, tests.xml, attack_jax.json, attack_torch.json,
attack_launches.json, train_jax.json, train_torch.json, adcorda_fashion_mnist.json; a missing
or broken one becomes a note) and writes the tables with the issue's targets: PGD >= 3x
torchattacks at the best batch of each model, train step >= 1.0x PyTorch AMP, one program
launch and no host synchronization per attack call.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

PGD_TARGET = 3.0     # x torchattacks, same GPU, best batch of each.
TRAIN_TARGET = 1.0   # x PyTorch AMP (channels_last), same GPU.


def _load(path: Path, notes: list[str]) -> Any:
  if not path.exists():
    notes.append(f"{path.name}: missing (its part failed or was skipped; see its .log)")
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as error:
    notes.append(f"{path.name}: unreadable ({error})")
    return None


def _records(data: Any) -> list[dict[str, Any]]:
  if isinstance(data, dict):
    data = data.get("records", [])
  return [r for r in data or [] if isinstance(r, dict)]


def _tests(path: Path) -> dict[str, Any] | None:
  if not path.exists():
    return None
  root = ElementTree.parse(path).getroot()
  suite = root if root.tag == "testsuite" else root.find("testsuite")
  if suite is None:
    return None
  counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
  counts["seconds"] = float(suite.get("time", 0))
  counts["failed"] = [f"{case.get('classname')}::{case.get('name')}"
                      for case in suite.iter("testcase")
                      if case.find("failure") is not None or case.find("error") is not None][:20]
  return counts


def _rows(jax_records, jax_rate, torch_records, torch_rate) -> dict[tuple, dict[str, Any]]:
  """{(model, batch): row}: each JAX implementation's `jax_rate` under its name and each
  PyTorch variant's `torch_rate` under `torch_<variant>`."""
  rows: dict[tuple, dict[str, Any]] = {}
  for records, rate, prefix, name_key in ((jax_records, jax_rate, "", "implementation"),
                                          (torch_records, torch_rate, "torch_", "variant")):
    for r in records:
      row = rows.setdefault((r["model"], r["batch"]), {"model": r["model"], "batch": r["batch"]})
      row[prefix + r[name_key]] = r.get(rate)
  return rows


def attack_rows(jax_records, torch_records) -> list[dict[str, Any]]:
  """One row per (model, batch): the library's PGD rate next to torchattacks' and compile's."""
  rows = _rows(jax_records, "img_steps_per_second", torch_records, "img_steps_per_second_median")
  for row in rows.values():
    ours, reference = row.get("adcorda"), row.get("torch_torchattacks")
    row["vs_torchattacks"] = ours / reference if ours and reference else None
    compiled = row.get("torch_compile")
    row["vs_torch_compile"] = ours / compiled if ours and compiled else None
  return sorted(rows.values(), key=lambda row: (row["model"], row["batch"]))


def best_batch_ratios(rows) -> dict[str, float | None]:
  """Per model: best library rate over batches / best torchattacks rate over batches."""
  out = {}
  for model in sorted({row["model"] for row in rows}):
    ours = [row.get("adcorda") for row in rows if row["model"] == model and row.get("adcorda")]
    ref = [row.get("torch_torchattacks") for row in rows
           if row["model"] == model and row.get("torch_torchattacks")]
    out[model] = max(ours) / max(ref) if ours and ref else None
  return out


def train_rows(jax_records, torch_records) -> list[dict[str, Any]]:
  rows = _rows(jax_records, "img_per_second", torch_records, "img_per_second")
  for row in rows.values():
    amp = row.get("torch_amp_channels_last")
    best = max([v for v in (row.get("adcorda"), row.get("bfloat16")) if v] or [0]) or None
    row["best_vs_torch_amp"] = best / amp if best and amp else None
  return sorted(rows.values(), key=lambda row: (row["model"], row["batch"]))


def _fmt(value: Any, digits: int = 0, suffix: str = "") -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:,.{digits}f}{suffix}"
  return f"{value}{suffix}"


def markdown(results: dict[str, Any]) -> str:
  lines = [f"# Accelerator check{' (dry run on the CPU)' if results['dry_run'] else ''}", ""]
  env = results.get("environment") or {}
  lines += [f"JAX {env.get('jax', '?')}, backend {env.get('backend', '?')}, "
            f"device {env.get('device', '?')}.", "", "## Parts", "",
            "| part | exit | seconds | timed out |", "|---|---:|---:|---|"]
  for part in results["parts"]:
    lines.append(f"| {part['part']} | {_fmt(part.get('rc'))} | {_fmt(part.get('seconds'), 1)} | "
                 f"{'yes' if part.get('timed_out') else ''}{part.get('skipped', '')} |")
  tests = results.get("tests")
  if tests:
    lines += ["", f"## Tests: {tests['tests']} run, {tests['failures']} failed, "
              f"{tests['errors']} errors, {tests['skipped']} skipped in {tests['seconds']:.0f} s"]
    lines += [f"- {name}" for name in tests["failed"]]
  lines += ["", "## PGD-10 throughput (img*step/s, median)", "",
            "| model | batch | this library | plain autodiff | torchattacks | torch.compile | "
            "vs torchattacks | vs torch.compile |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for row in results["attack"]:
    lines.append(f"| {row['model']} | {row['batch']} | {_fmt(row.get('adcorda'))} | "
                 f"{_fmt(row.get('autodiff'))} | {_fmt(row.get('torch_torchattacks'))} | "
                 f"{_fmt(row.get('torch_compile'))} | {_fmt(row.get('vs_torchattacks'), 2, 'x')} | "
                 f"{_fmt(row.get('vs_torch_compile'), 2, 'x')} |")
  lines += ["", f"Best batch vs best batch (target >= {PGD_TARGET:g}x torchattacks): " + ", ".join(
      f"{model} {_fmt(ratio, 2, 'x')}" for model, ratio in results["attack_best_batch"].items())]
  launches = results.get("attack_launches") or []
  if launches:
    lines += ["", "## One launch per attack call", "",
              "| attack | programs per call | other top-level ops | no host sync |",
              "|---|---:|---|---|"]
    lines += [f"| {r['attack']} | {r['programs_per_call']} | "
              f"{', '.join(r['ops_outside_programs']) or '-'} | {r['no_host_sync']} |"
              for r in launches]
  lines += ["", "## Train step (img/s, median)", "",
            "| model | batch | this library fp32 | this library bf16 | torch channels_last | "
            "torch AMP bf16 channels_last | torch.compile | best vs AMP |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for row in results["train"]:
    lines.append(f"| {row['model']} | {row['batch']} | {_fmt(row.get('adcorda'))} | "
                 f"{_fmt(row.get('bfloat16'))} | {_fmt(row.get('torch_channels_last'))} | "
                 f"{_fmt(row.get('torch_amp_channels_last'))} | {_fmt(row.get('torch_compile'))} "
                 f"| {_fmt(row.get('best_vs_torch_amp'), 2, 'x')} |")
  adcorda = results.get("adcorda_fashion_mnist")
  if adcorda:
    lines += ["", f"## Fashion-MNIST AdCorDA, one seed: {_fmt(adcorda.get('wall_seconds'), 0)} s",
              "", "| variant | test accuracy |", "|---|---:|"]
    for name, accuracy in adcorda.get("test_accuracy", {}).items():
      lines.append(f"| {name} | {_fmt(accuracy, 4)} |")
  if results["notes"]:
    lines += ["", "## Notes", ""] + [f"- {note}" for note in results["notes"]]
  return "\n".join(lines) + "\n"


def _adcorda_summary(data: Any, parts: list[dict[str, Any]]) -> dict[str, Any] | None:
  if not isinstance(data, dict):
    return None
  seconds = data.get("wall_seconds") or next(
      (p["seconds"] for p in parts if p["part"] == "adcorda_fashion_mnist"), None)
  variants = data.get("variants") or {}
  accuracies = {name: variants[name].get("test_accuracy")
                for name in data.get("variant_order", variants) if isinstance(variants.get(name), dict)}
  return {"wall_seconds": seconds, "status": data.get("status"), "test_accuracy": accuracies,
          "robust_accuracy": {name: variants[name].get("robust_accuracy") for name in accuracies}}


def _write_atomic(path: Path, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out_dir", type=Path)
  parser.add_argument("--dry-run", type=int, default=0)
  args = parser.parse_args()
  out, notes = args.out_dir, []
  parts = [json.loads(line) for line in (out / "parts.jsonl").read_text().splitlines()
           if line.strip()] if (out / "parts.jsonl").exists() else []
  attack = attack_rows(_records(_load(out / "attack_jax.json", notes)),
                       _records(_load(out / "attack_torch.json", notes)))
  results = {
      "dry_run": bool(args.dry_run),
      "environment": _load(out / "environment.json", notes),
      "parts": parts,
      "tests": _tests(out / "tests.xml"),
      "attack": attack,
      "attack_best_batch": best_batch_ratios(attack),
      "attack_launches": _load(out / "attack_launches.json", notes),
      "train": train_rows(_records(_load(out / "train_jax.json", notes)),
                          _records(_load(out / "train_torch.json", notes))),
      "adcorda_fashion_mnist": _adcorda_summary(
          _load(out / "adcorda_fashion_mnist.json", notes), parts),
      "targets": {"pgd_vs_torchattacks_best_batch": PGD_TARGET,
                  "train_step_vs_torch_amp": TRAIN_TARGET},
  }
  results["notes"] = notes
  _write_atomic(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
  _write_atomic(out / "report.md", markdown(results))
  print(markdown(results))


if __name__ == "__main__":
  main()

"""Per-step metrics as JSON lines (`metrics.jsonl`), consistent with checkpoints on resume.

A run killed between two checkpoints may have logged steps beyond the checkpoint it resumes
from; `truncate_after(step)` drops those so the log describes exactly one training trajectory.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adcorda_jax import workdir as workdir_lib


class MetricsLog:
  """Appends one JSON record per line; each record carries a `step`."""

  def __init__(self, path: str | Path):
    self.path = Path(path)

  def read(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    records = []
    for line in self.path.read_text().splitlines():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # A line cut short by a kill: everything after it is stale.
        break
    return records

  def truncate_after(self, step: int) -> None:
    """Keeps only records with `step <= step` (atomically rewritten)."""
    records = [r for r in self.read() if r.get("step", 0) <= step]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    workdir_lib.write_text_atomic(self.path, text)

  def write(self, record: dict[str, Any]) -> None:
    if not workdir_lib.is_writer():
      return
    with self.path.open("a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")

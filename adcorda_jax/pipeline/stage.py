"""A stage: one sub-folder of a run, fingerprinted by the settings and inputs it reads.

`stage.json` holds the stage's fingerprint (flat dotted config keys plus content digests of its
inputs, `pipeline.fingerprint`). A later stage's fingerprint includes the earlier ones, so a
config change is reported at the first stage it invalidates, as a one-line CheckpointError
naming the keys, and artifacts of two configs never mix. A finished stage writes `done.json` (its
small outputs) last, atomically: present means finished, absent means resume or redo.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from adcorda_jax import workdir as workdir_lib
from adcorda_jax.pipeline import fingerprint

STAGE_FILE = "stage.json"
DONE_FILE = "done.json"
REDO_REMEDY = ("restore those values, or delete that folder (and the later stages' folders) to "
               "redo it, or use a new --workdir")


@dataclasses.dataclass(frozen=True)
class Stage:
  """The folder `directory` of stage `name` (the word the messages and the report use).

  `retired_keys`: keys that records of an earlier release may hold but this stage no longer
  reads; a recorded value for one of them is not a difference (e.g. the alignment keys in the
  cross-entropy-only fine-tuning runs).
  """
  directory: Path
  name: str
  keys: dict[str, Any]
  retired_keys: frozenset[str] = frozenset()

  def claim(self) -> "Stage":
    """Records the fingerprint, or checks it equals the recorded one (one-line error if not)."""
    path = self.directory / STAGE_FILE
    if path.exists():
      recorded = workdir_lib.read_json(path)
      recorded = {k: v for k, v in (recorded if isinstance(recorded, dict) else {}).items()
                  if k in self.keys or k not in self.retired_keys}
      check(recorded, self.keys, f"stage {self.name!r} in {str(self.directory)!r}")
      return self
    workdir_lib.makedirs(self.directory)
    workdir_lib.write_json_atomic(path, self.keys)
    return self

  def done(self) -> dict[str, Any] | None:
    """The outputs the finished stage recorded, or None if it has not finished."""
    return load_done(self.directory)

  def finish(self, outputs: dict[str, Any]) -> dict[str, Any]:
    """Records the stage's outputs; from now on it counts as finished."""
    workdir_lib.write_json_atomic(self.directory / DONE_FILE, outputs)
    return outputs


def check(recorded: dict[str, Any], current: dict[str, Any], what: str,
          remedy: str = REDO_REMEDY, ignore: frozenset[str] = frozenset()) -> None:
  """Raises the one mismatch error if `recorded` and `current` differ outside `ignore`."""
  changed = fingerprint.differences(recorded, current, ignore)
  if changed:
    raise fingerprint.mismatch_error(what, changed, remedy)


def load_done(directory: Path) -> dict[str, Any] | None:
  """The outputs a finished stage recorded in `directory`, or None if it has not finished."""
  path = directory / DONE_FILE
  return workdir_lib.read_json(path) if path.exists() else None

"""The run directory: atomic artifact writes, config fingerprints, finished-run detection.

A workdir holds one run. Re-running the same command on it resumes the run; running a different
config on it is refused (naming the keys that differ) so artifacts of two configs never mix.
Every artifact is written to a temporary file and renamed into place, so a killed run never leaves
a half-written `results.json`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable

import jax
import ml_collections
from absl import logging

from adcorda_jax.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
# Fields that may change between a run and its resumption without invalidating artifacts.
RESUMABLE_KEYS = frozenset({"train.log_every_steps", "train.max_checkpoints", "distributed",
                            "cpu_devices"})


def is_writer() -> bool:
  """Only process 0 writes artifacts in a multi-host run."""
  return jax.process_index() == 0


def prepare(workdir: str | os.PathLike) -> Path:
  """Creates `workdir` if needed and checks that it is writable."""
  path = Path(workdir).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
      pass
  except OSError as e:
    raise CheckpointError(f"workdir {str(path)!r} is not writable: {e.strerror or e}") from None
  return path


def write_atomic(path: str | os.PathLike, write: Callable[[IO[Any]], Any],
                 mode: str = "w") -> None:
  """Calls `write(file)` on a temporary file beside `path`, then renames it over `path`.

  Readers see the old file or the complete new one, never a partial write; only the writer
  process (process 0) writes.
  """
  if not is_writer():
    return
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` through a temporary file and an atomic rename."""
  write_atomic(path, lambda f: f.write(text))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
  if hasattr(obj, "tolist"):  # numpy / jax scalars and arrays
    return obj.tolist()
  if isinstance(obj, (tuple, set, frozenset)):
    return list(obj)
  raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON artifact; a corrupt file is a one-line error naming it."""
  try:
    return json.loads(Path(path).read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"cannot read {str(path)!r}: {e}") from None


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A JSON-safe plain dict of the resolved config (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict(), default=_json_default))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten(value, f"{prefix}{key}."))
    return flat
  return {prefix[:-1]: tree}


def config_differences(old: dict[str, Any], new: dict[str, Any],
                       ignore: Iterable[str] = RESUMABLE_KEYS) -> list[str]:
  """Dotted keys whose values differ between two config dicts, excluding `ignore`."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  keys = sorted(set(old_flat) | set(new_flat))
  return [k for k in keys if k not in ignore and old_flat.get(k) != new_flat.get(k)]


def claim(workdir: Path, config: ml_collections.ConfigDict) -> None:
  """Records `config` in the workdir, or checks it matches the run already recorded there."""
  config_path = workdir / CONFIG_FILE
  current = config_to_dict(config)
  if config_path.exists():
    differences = config_differences(read_json(config_path), current)
    if differences:
      shown = ", ".join(differences[:5]) + (" ..." if len(differences) > 5 else "")
      raise ConfigError(
          f"workdir {str(workdir)!r} holds a run with a different config (differs at: {shown}); "
          "use a new --workdir or restore the original values")
  write_json_atomic(config_path, current)


def start_run(workdir: str | os.PathLike,
              config: ml_collections.ConfigDict) -> tuple[Path, dict[str, Any] | None]:
  """Prepares and claims `workdir` for `config`: (workdir, saved results if it already finished)."""
  path = prepare(workdir)
  claim(path, config)
  finished = finished_results(path)
  if finished is not None:
    logging.info("Run in %s already finished; returning its saved results.", path)
  return path, finished


def finished_results(workdir: Path) -> dict[str, Any] | None:
  """The saved results of a finished run in `workdir`, or None if it has not finished."""
  path = workdir / RESULTS_FILE
  if not path.exists():
    return None
  results = read_json(path)
  return results if results.get("status") == "complete" else None

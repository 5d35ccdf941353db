"""Artifacts of a workdir: written atomically by the writer process, read with one-line errors.

The run lifecycle (lock, claim, resume, results envelope) is `adcorda_jax.pipeline`; this module
is the file layer under it. Every artifact is written to a temporary file and renamed into place,
with the permissions a plain `open()` gives under the umask, so a killed run never leaves a
half-written `results.json` and colleagues can read a shared run. A full disk is a one-line error
naming the path.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

import jax
import ml_collections

from adcorda_jax import faults, interrupts
from adcorda_jax.errors import CheckpointError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


def is_writer() -> bool:
  """Only process 0 writes artifacts in a multi-host run.

  The other processes read the workdir (it must be on a filesystem every process sees) and
  write nothing there but their own shards of orbax checkpoints (`ocdbt.process_<i>/`,
  `array_metadatas/process_<i>` inside a step being saved, as orbax lays them out).
  """
  return jax.process_index() == 0


def makedirs(path: str | os.PathLike) -> Path:
  """Creates the folder `path` (and its parents) on the writer process; returns it."""
  path = Path(path)
  if is_writer():
    path.mkdir(parents=True, exist_ok=True)
  return path


def prepare(workdir: str | os.PathLike) -> Path:
  """Creates `workdir` if needed and checks that it is writable (the writer process only: the
  others wait for it in `pipeline.open_run`)."""
  path = Path(workdir).expanduser()
  if not is_writer():
    return path
  for parent in (path, *path.parents):
    if parent.exists() and not parent.is_dir():
      where = "" if parent == path else f"cannot be created: {str(parent)!r} "
      raise CheckpointError(f"workdir {str(path)!r} {where}is a file, not a directory")
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
  with interrupts.deferred():
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
      os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; honour the umask instead.
      with os.fdopen(fd, mode) as f:
        faults.point("artifact_write", path)
        write(f)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except OSError as e:
      Path(tmp).unlink(missing_ok=True)
      if is_disk_full(e):
        raise CheckpointError(disk_full_message(path)) from None
      raise
    except BaseException:
      Path(tmp).unlink(missing_ok=True)
      raise


def current_umask() -> int:
  """The process umask, read without changing it where the OS allows."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)  # Elsewhere the only portable way; restored at once.
  os.umask(mask)
  return mask


def error_chain(error: BaseException | None) -> list[BaseException]:
  """`error` and its causes/contexts, outermost first (each once)."""
  chain: list[BaseException] = []
  while error is not None and all(error is not seen for seen in chain):
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def is_disk_full(error: BaseException | None) -> bool:
  """Whether `error` or anything in its cause/context chain is ENOSPC or EDQUOT."""
  return any((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
             or "No space left on device" in str(e)  # Wrapped by orbax/tensorstore as text.
             for e in error_chain(error))


def disk_full_message(path: str | os.PathLike, needed_bytes: int | None = None,
                      kept: str = "") -> str:
  needed = f" (about {needed_bytes / 2**20:.1f} MiB needed)" if needed_bytes else ""
  return (f"no space left on device writing {str(path)!r}{needed}; "
          f"{kept or 'files written before it are intact'}; free space and rerun the same command")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` through a temporary file and an atomic rename."""
  write_atomic(path, lambda f: f.write(text))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n")


def json_default(obj: Any) -> Any:
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
  return json.loads(json.dumps(config.to_dict(), default=json_default))

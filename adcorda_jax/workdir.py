"""The run directory: one run per workdir, locked, claimed late, written atomically.

A workdir holds one run. `open_run` takes an exclusive lock on it (a second command on the same
workdir is refused, naming the holder's PID) and returns the saved results of a finished run.
`Run.claim()` records the config in `config.json` only once the task has checked everything it
can before work starts, so a command that fails validation leaves nothing that blocks the
corrected command; a workdir whose only content is such a claim may be re-claimed by any config.
Re-running the same command resumes the run; a different config on a workdir with work in it is
refused (naming the keys that differ), so artifacts of two configs never mix.

Every artifact is written to a temporary file and renamed into place, with the permissions a
plain `open()` gives under the umask, so a killed run never leaves a half-written `results.json`
and colleagues can read a shared run. A full disk is a one-line error naming the path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

import jax
import ml_collections
from absl import logging

from adcorda_jax import faults, interrupts
from adcorda_jax.errors import AdcordaError, CheckpointError, ConfigError

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
LOCK_FILE = ".lock"
# Fields that may change between a run and its resumption without invalidating artifacts.
RESUMABLE_KEYS = frozenset({"train.log_every_steps", "train.max_checkpoints", "distributed",
                            "cpu_devices"})


def is_writer() -> bool:
  """Only process 0 writes artifacts in a multi-host run."""
  return jax.process_index() == 0


def prepare(workdir: str | os.PathLike) -> Path:
  """Creates `workdir` if needed and checks that it is writable."""
  path = Path(workdir).expanduser()
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


def has_work(workdir: Path) -> bool:
  """Whether `workdir` holds anything but a claim (config.json, its lock, temporary files)."""
  return any(entry.name != CONFIG_FILE and not entry.name.startswith(".")
             for entry in workdir.iterdir())


def mismatch_error(what: str, differences: list[str], remedy: str,
                   error: type[AdcordaError] = CheckpointError) -> AdcordaError:
  """The one wording of "this folder was made with a different config"."""
  shown = ", ".join(differences[:5]) + (" ..." if len(differences) > 5 else "")
  return error(f"{what} was made with a different config (differs at: {shown}); {remedy}")


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` (released on any exit, `kill -9` included).

  A second run on the same workdir is refused with a one-line error naming the holder's PID.
  Only the writer process locks: the other processes of a multi-host run share its workdir.
  """
  if not is_writer():
    yield
    return
  path = workdir / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      raise CheckpointError(
          f"workdir {str(workdir)!r} is in use by another run (pid {holder}); wait for it to "
          "finish or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # Closing the descriptor releases the lock.


@dataclasses.dataclass
class Run:
  """An open, locked workdir: the saved results if it finished, else a run to (re)start.

  Opened `strict` (train, robustness, benchmark_attack), a run is one artifact of the whole
  config: a changed config is refused once there is work. Staged runs (adcorda, quantize,
  compression_study) fingerprint each stage instead and record the config as information.
  """
  path: Path
  config: dict[str, Any]
  finished: dict[str, Any] | None
  extended_from: dict[str, Any] = dataclasses.field(default_factory=dict)  # key -> old value.

  def claim(self) -> None:
    """Records the config; call it once everything checkable before work has been checked."""
    if self.finished is None:
      write_json_atomic(self.path / CONFIG_FILE, self.config)


def _increases(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> dict[str, Any]:
  """{key: old value} if every key's value is a number that grew, else {}."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  grown = {}
  for key in keys:
    before, after = old_flat.get(key), new_flat.get(key)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (before, after)):
      return {}
    if after <= before:
      return {}
    grown[key] = before
  return grown


def _check_same(recorded: dict[str, Any], current: dict[str, Any], ignore: frozenset[str],
                extendable: frozenset[str], what: str) -> dict[str, Any]:
  """Refuses a config that differs from `recorded` outside `ignore`, unless only `extendable`
  keys grew: then returns {key: recorded value} for them."""
  differences = config_differences(recorded, current, ignore)
  if not differences:
    return {}
  if set(differences) <= extendable:
    grown = _increases(recorded, current, differences)
    if grown:
      return grown
  grow = sorted(set(differences) & extendable)
  how = f"; {', '.join(grow)} may only grow (that continues the run)" if grow else ""
  raise mismatch_error(what, differences,
                       f"use a new --workdir or restore the original values{how}", ConfigError)


@contextlib.contextmanager
def open_run(workdir: str | os.PathLike, config: ml_collections.ConfigDict, *,
             strict: bool = True, ignore: Iterable[str] = RESUMABLE_KEYS,
             extendable: Iterable[str] = ()) -> Iterator[Run]:
  """Prepares and locks `workdir` for `config` for the duration of the block.

  Raises a one-line CheckpointError if another run holds the lock, or (`strict`) if the workdir
  holds work of a config that differs outside `ignore`. A finished run of the same config comes
  back as `run.finished` and nothing is rewritten. Raising only `extendable` integer keys (e.g.
  `train.epochs`) continues the run: `run.extended_from` holds their previous values.
  """
  path = prepare(workdir)
  current = config_to_dict(config)
  ignore, extendable = frozenset(ignore), frozenset(extendable)
  extended_from: dict[str, Any] = {}
  with locked(path):
    config_path = path / CONFIG_FILE
    if strict and config_path.exists() and has_work(path):
      extended_from = _check_same(read_json(config_path), current, ignore, extendable,
                                  f"workdir {str(path)!r}")
    finished = finished_results(path)
    if finished is not None:
      changed = config_differences(finished.get("config", {}), current, ignore)
      if changed and strict:
        extended_from = _check_same(finished.get("config", {}), current, ignore, extendable,
                                    f"the finished run in {str(path)!r}") or extended_from
      if changed:
        finished = None  # Extended, or staged (the stages decide what is still valid).
    if finished is not None:
      logging.info("Run in %s already finished; returning its saved results.", path)
    yield Run(path=path, config=current, finished=finished, extended_from=extended_from)


def finished_results(workdir: Path) -> dict[str, Any] | None:
  """The saved results of a finished run in `workdir`, or None if it has not finished."""
  path = workdir / RESULTS_FILE
  if not path.exists():
    return None
  results = read_json(path)
  return results if isinstance(results, dict) and results.get("status") == "complete" else None

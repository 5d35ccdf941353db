"""A run: one task's config in one workdir, locked, claimed late, resumed, finished once.

Every task goes through `open_run`:

    with pipeline.open_run(workdir, config, task="quantize", strict=False) as run:
      if run.finished is not None:
        return run.finished            # Same config, already done: nothing is rewritten.
      settings = read_settings(config)   # Every check that can fail before work starts...
      run.claim()                        # ...then the workdir is claimed (config.json, run.json).
      ...                                # Stages (`run.stage(...)`) skip or resume their work.
      return run.finish(run.results(dataset=..., **fields), report=..., summary=...)

`open_run` takes an exclusive lock (a second command on the workdir is refused, naming the
holder's PID). A run opened `strict` (train, robustness, benchmark_attack) is one artifact of the
whole config: a changed config is refused once the workdir holds work, except `extendable`
integer keys that grew (`train.epochs`), which continue it. Staged runs fingerprint each stage
instead and record the config as information. A workdir whose only content is a claim may be
re-claimed by any config, so a command that failed validation never blocks the corrected one.

`run.json` records the workdir format (`FORMAT_VERSION`) and the release that claimed it. A
workdir without one was written by release 0.1.0 (format 1), whose layout this release reads;
a workdir of a newer format is refused with a one-line error naming the release that wrote it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import ml_collections
from absl import logging

from adcorda_jax import __version__, distributed
from adcorda_jax import workdir as workdir_lib
from adcorda_jax.errors import CheckpointError, ConfigError
from adcorda_jax.pipeline import fingerprint
from adcorda_jax.pipeline.stage import Stage

LOCK_FILE = ".lock"
RUN_FILE = "run.json"
# The layout of a workdir. 1: release 0.1.0 (no run.json); 2: this release, which reads both.
FORMAT_VERSION = 2
_CLAIM_FILES = frozenset({workdir_lib.CONFIG_FILE, RUN_FILE})


@contextlib.contextmanager
def locked(workdir: Path) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` (released on any exit, `kill -9` included).

  A second run on the same workdir is refused with a one-line error naming the holder's PID.
  Only the writer process locks: the other processes of a multi-host run share its workdir
  (a second multi-process run is refused by its process 0; the others then stop, having lost
  their peer).
  """
  if not workdir_lib.is_writer():
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


def has_work(workdir: Path) -> bool:
  """Whether `workdir` holds anything but a claim (config.json, run.json, lock, temporaries)."""
  return any(entry.name not in _CLAIM_FILES and not entry.name.startswith(".")
             for entry in workdir.iterdir())


@dataclasses.dataclass
class Run:
  """An open, locked workdir: the saved results if it finished, else a run to (re)start."""
  path: Path
  task: str
  config: dict[str, Any]
  finished: dict[str, Any] | None
  extended_from: dict[str, Any] = dataclasses.field(default_factory=dict)  # key -> old value.
  started: float = dataclasses.field(default_factory=time.perf_counter)

  def claim(self) -> None:
    """Records the config and format; call it once everything checkable has been checked."""
    if self.finished is None:
      workdir_lib.write_json_atomic(self.path / RUN_FILE, {
          "format_version": FORMAT_VERSION, "release": __version__, "task": self.task})
      workdir_lib.write_json_atomic(self.path / workdir_lib.CONFIG_FILE, self.config)

  def stage(self, relative: str | Path, name: str, keys: dict[str, Any],
            retired_keys: Iterable[str] = ()) -> Stage:
    """The claimed stage folder `<workdir>/<relative>` with fingerprint `keys` (see Stage)."""
    return Stage(self.path / relative, name, keys, frozenset(retired_keys)).claim()

  def results(self, **fields: Any) -> dict[str, Any]:
    """The results envelope every task shares around the task's own `fields`."""
    return {"status": "complete", "task": self.task, "format_version": FORMAT_VERSION,
            **fields,
            **({"extended_from": self.extended_from} if self.extended_from else {}),
            "devices": jax.device_count(), "backend": jax.default_backend(),
            "wall_seconds": time.perf_counter() - self.started, "config": self.config}

  def finish(self, results: dict[str, Any], *, report: str | None, summary: str,
             plots: Sequence[Callable[[], None]] = ()) -> dict[str, Any]:
    """Writes plots, `report.md`, `config.json` and, last, `results.json` (atomically each).

    `results.json` last: present (status complete) means every other artifact is there.
    """
    if workdir_lib.is_writer():
      for plot in plots:
        plot()
      if report is not None:
        workdir_lib.write_text_atomic(self.path / "report.md", report)
    workdir_lib.write_json_atomic(self.path / workdir_lib.CONFIG_FILE, results["config"])
    workdir_lib.write_json_atomic(self.path / workdir_lib.RESULTS_FILE, results)
    logging.info("Done: %s; results in %s", summary, self.path / workdir_lib.RESULTS_FILE)
    return results


def _increases(old: dict[str, Any], new: dict[str, Any], keys: list[str]) -> dict[str, Any]:
  """{key: old value} if every key's value is a number that grew, else {}."""
  old_flat, new_flat = fingerprint.flatten(old), fingerprint.flatten(new)
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
  changed = fingerprint.differences(recorded, current, ignore)
  if not changed:
    return {}
  if set(changed) <= extendable:
    grown = _increases(recorded, current, changed)
    if grown:
      return grown
  grow = sorted(set(changed) & extendable)
  how = f"; {', '.join(grow)} may only grow (that continues the run)" if grow else ""
  raise fingerprint.mismatch_error(
      what, changed, f"use a new --workdir or restore the original values{how}", ConfigError)


def _check_format(path: Path) -> None:
  """Refuses a workdir whose `run.json` names a format newer than this release reads."""
  record_path = path / RUN_FILE
  if not record_path.exists():
    return  # Release 0.1.0 (format 1) wrote no run.json; its layout is read as it is.
  record = workdir_lib.read_json(record_path)
  version = record.get("format_version") if isinstance(record, dict) else None
  if not isinstance(version, int) or version > FORMAT_VERSION:
    release = record.get("release", "an unknown release") if isinstance(record, dict) else "?"
    raise CheckpointError(
        f"workdir {str(path)!r} was written by adcorda-jax {release} (workdir format "
        f"{version!r}); this release ({__version__}) reads formats 1-{FORMAT_VERSION}: use that "
        "release or a new --workdir")


@contextlib.contextmanager
def open_run(workdir: str | os.PathLike, config: ml_collections.ConfigDict, *, task: str,
             strict: bool = True, ignore: Iterable[str] = fingerprint.RESUMABLE_KEYS,
             extendable: Iterable[str] = ()) -> Iterator[Run]:
  """Prepares and locks `workdir` for `config` for the duration of the block.

  Raises a one-line error if another run holds the lock, if a newer release wrote the workdir,
  or (`strict`) if the workdir holds work of a config that differs outside `ignore`. A finished
  run of the same config comes back as `run.finished` and nothing is rewritten. Raising only
  `extendable` integer keys (e.g. `train.epochs`) continues the run: `run.extended_from` holds
  their previous values.
  """
  path = workdir_lib.prepare(workdir)
  distributed.barrier("open_run: prepared")  # The other processes read it once it exists.
  current = workdir_lib.config_to_dict(config)
  ignore, extendable = frozenset(ignore), frozenset(extendable)
  extended_from: dict[str, Any] = {}
  with locked(path):
    _check_format(path)
    config_path = path / workdir_lib.CONFIG_FILE
    if strict and config_path.exists() and has_work(path):
      extended_from = _check_same(workdir_lib.read_json(config_path), current, ignore,
                                  extendable, f"workdir {str(path)!r}")
    finished = finished_results(path)
    if finished is not None:
      changed = fingerprint.differences(finished.get("config", {}), current, ignore)
      if changed and strict:
        extended_from = _check_same(finished.get("config", {}), current, ignore, extendable,
                                    f"the finished run in {str(path)!r}") or extended_from
      if changed:
        finished = None  # Extended, or staged (the stages decide what is still valid).
    if finished is not None:
      logging.info("Run in %s already finished; returning its saved results.", path)
    # Every process has read the workdir as it was before the writer changes anything.
    distributed.barrier("open_run: checked")
    yield Run(path=path, task=task, config=current, finished=finished,
              extended_from=extended_from)


def finished_results(workdir: Path) -> dict[str, Any] | None:
  """The saved results of a finished run in `workdir`, or None if it has not finished."""
  path = workdir / workdir_lib.RESULTS_FILE
  if not path.exists():
    return None
  results = workdir_lib.read_json(path)
  return results if isinstance(results, dict) and results.get("status") == "complete" else None

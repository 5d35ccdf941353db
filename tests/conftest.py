"""Fixtures shared by the test modules: one tiny trained baseline for the whole session.

`tiny_baseline` trains `configs/tiny.py` once (seconds) and is shared READ-ONLY by every test that
only needs *a* finished training run (the robustness, quantize and hardening tests). Its files
are made read-only, and its teardown fails if any test changed, added or removed one: a test that
writes into a run (resumes it, locks it, damages it) takes `tiny_baseline.copy_to(tmp_path / ...)`.
Tests whose subject is training a baseline (resume equals uninterrupted, the baseline stage of a
task's workdir) still train their own.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import shutil
import stat
from pathlib import Path
from typing import Any, Iterator

import pytest

from adcorda_jax.training import trainer
from configs import tiny

_WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


def _snapshot(root: Path) -> dict[str, tuple[int, int, str] | None]:
  """{relative path: (mtime_ns, size, sha1) for files, None for folders} of everything in `root`."""
  entries: dict[str, tuple[int, int, str] | None] = {}
  for path in sorted(root.rglob("*")):
    name = str(path.relative_to(root))
    if path.is_file() and not path.is_symlink():
      info = path.stat()
      entries[name] = (info.st_mtime_ns, info.st_size, hashlib.sha1(path.read_bytes()).hexdigest())
    else:
      entries[name] = None
  return entries


def _set_writable(root: Path, writable: bool) -> None:
  """Adds the owner's write bit to, or removes every write bit from, `root` and all it holds."""
  for path in [root, *root.rglob("*")]:
    if not path.is_symlink():
      mode = stat.S_IMODE(path.stat().st_mode)
      path.chmod(mode | stat.S_IWUSR if writable else mode & ~_WRITE_BITS)


@dataclasses.dataclass(frozen=True)
class TrainedBaseline:
  """A finished `configs/tiny.py` training run (small_cnn, width 0.5, 2 epochs on 256 digits)."""
  workdir: Path            # Read-only: pass it where a checkpoint or a training run is read.
  _results: dict[str, Any]

  @property
  def results(self) -> dict[str, Any]:
    """What `train_and_evaluate` returned (a fresh copy: the shared one cannot be changed)."""
    return copy.deepcopy(self._results)

  def copy_to(self, destination: Path) -> Path:
    """A writable copy of the whole run at `destination` (which must not exist yet)."""
    shutil.copytree(self.workdir, destination)
    _set_writable(destination, True)
    return destination


@pytest.fixture(scope="session")
def tiny_baseline(tmp_path_factory) -> Iterator[TrainedBaseline]:
  """The session's one trained baseline; fails at teardown if a test wrote into it."""
  workdir = tmp_path_factory.mktemp("tiny_baseline")
  results = trainer.train_and_evaluate(tiny.get_config(), workdir)
  _set_writable(workdir, False)  # Stops writes by non-root users; the snapshot catches root's.
  before = _snapshot(workdir)
  yield TrainedBaseline(workdir, results)
  after = _snapshot(workdir)
  _set_writable(workdir, True)  # So that pytest can delete old temporary folders.
  changed = sorted(name for name in before.keys() | after.keys()
                   if before.get(name) != after.get(name))
  assert not changed, f"tests wrote into the shared baseline {workdir}: {changed[:10]}"

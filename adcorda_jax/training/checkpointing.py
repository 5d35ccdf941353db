"""Orbax checkpoints: periodic saves of the train state, resume, and loading a model by path.

Each checkpoint holds two items: `state` (params, BatchNorm statistics, optimizer state, step) and
`meta` (JSON: how to rebuild the model: model config, number of classes, normalization constants,
image shape, dataset). `meta` is what lets a later stage (attacks, AdCorDA, compression) load a
trained baseline from another run's workdir without that run's config.
"""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from adcorda_jax import distributed, faults, interrupts, workdir as workdir_lib
from adcorda_jax.errors import CheckpointError
from adcorda_jax.models import create_model

CHECKPOINT_DIR = "checkpoints"
_METADATA_BYTES = 64 * 1024  # Orbax's metadata files per step, generously.
CORRUPT_DIR = "corrupt_checkpoints"  # Unreadable steps are moved here, beside CHECKPOINT_DIR.
INTEGRITY_FILE = "integrity.json"    # Size and SHA-1 of every file of a step, written after it.
# Orbax/tensorstore words for unreadable bytes, for steps saved before INTEGRITY_FILE existed.
_READ_FAILURE = re.compile(r"DATA_LOSS|OUT_OF_RANGE|Error reading|truncat|corrupt|JSONDecode|"
                           r"Expecting value|Unexpected end|checksum", re.IGNORECASE)


def _file_digests(step_dir: Path) -> dict[str, list[Any]]:
  digests = {}
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and path.name != INTEGRITY_FILE:
      digests[str(path.relative_to(step_dir))] = [
          path.stat().st_size, hashlib.sha1(path.read_bytes()).hexdigest()]
  return digests


def integrity_problem(step_dir: Path) -> str | None:
  """Why the files of a saved step differ from what was written, or None if they match (or
  the step predates integrity records)."""
  record = step_dir / INTEGRITY_FILE
  if not record.exists():
    return None
  try:
    expected = dict(workdir_lib.read_json(record))
  except (CheckpointError, TypeError, ValueError):
    return f"its {INTEGRITY_FILE} is unreadable"
  actual = _file_digests(step_dir)
  for name, (size, sha1) in sorted(expected.items()):
    if name not in actual:
      return f"{name} is missing"
    if actual[name][0] != size:
      return f"{name} has {actual[name][0]} bytes, {size} were written"
    if actual[name][1] != sha1:
      return f"{name} has changed since it was written (SHA-1 differs)"
  return None


def _tree_bytes(tree: Any) -> int:
  return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(tree))


def short_reason(error: BaseException) -> str:
  """The first line of an orbax/tensorstore error, without its C++ source locations."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  text = re.sub(r"\s*\[source locations=.*", "", text)
  text = re.sub(r"\s*\(?(at|from) \S+\.(cc|h|cpp):\d+.*", "", text)
  return text[:200].rstrip(" :;,")


class Checkpointer:
  """Saves and restores train states under `<workdir>/checkpoints`."""

  def __init__(self, directory: str | Path, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes checkpoint `step` atomically (orbax renames a finished temporary directory).

    SIGINT/SIGTERM arriving during the write are delivered once it is complete. A full disk is
    a one-line CheckpointError; the partial step is removed and the earlier steps are kept.
    """
    needed = _tree_bytes(state) + _METADATA_BYTES
    if shutil.disk_usage(self.directory).free < needed:
      # Checked first: orbax's threads report a write that runs out of space mid-way noisily.
      # Every process checks (one shared filesystem), so all of them stop with this line.
      raise CheckpointError(workdir_lib.disk_full_message(
          self.directory / str(step), needed, self._kept_message(step)))
    with interrupts.deferred():
      try:
        faults.point("checkpoint_write", self.directory / str(step))
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()
        step_dir = self.directory / str(step)
        if workdir_lib.is_writer() and step_dir.is_dir():
          workdir_lib.write_json_atomic(step_dir / INTEGRITY_FILE, _file_digests(step_dir))
      except Exception as e:
        if not workdir_lib.is_disk_full(e):
          raise
        if workdir_lib.is_writer():
          for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(workdir_lib.disk_full_message(
            self.directory / str(step), needed, self._kept_message(step))) from None

  def _kept_message(self, failed_step: int) -> str:
    last = max((s for s in self._manager.all_steps() if s != failed_step), default=None)
    return (f"the last good checkpoint (step {last}) is kept" if last is not None
            else "no earlier checkpoint exists")

  def restore_latest_good(self, target: Any) -> tuple[Any, dict[str, Any], int] | None:
    """Restores the newest checkpoint that reads back: (state, meta, step), or None if none.

    A step whose files differ from what was written (truncated, missing or changed) is moved
    aside to `<parent>/corrupt_checkpoints/<step>`, not deleted, with a warning saying why. A
    step that is intact but does not fit `target` is an error: it is not moved.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      problem = integrity_problem(self.directory / str(step))
      if problem is None:
        try:
          state, meta = self._restore_checked(target, step)
          return state, meta, step
        except CheckpointError as e:
          recorded = (self.directory / str(step) / INTEGRITY_FILE).exists()
          if recorded or not _READ_FAILURE.search(str(e)):
            raise
          problem = str(e).split(": ", 1)[-1]
      aside = self._move_aside(step)
      logging.warning("Skipped checkpoint step %d in %s: %s; moved it to %s.", step,
                      self.directory, problem, aside)
    return None

  def _move_aside(self, step: int) -> Path:
    """Moves step `step` to CORRUPT_DIR: the writer moves it, every process then reloads."""
    distributed.barrier(f"checkpoint step {step} found corrupt")  # All look before it moves.
    aside_dir = self.directory.parent / CORRUPT_DIR
    aside = aside_dir / str(step)
    suffix = 1
    while aside.exists():
      aside, suffix = aside_dir / f"{step}.{suffix}", suffix + 1
    with interrupts.deferred():
      if workdir_lib.is_writer():
        aside_dir.mkdir(exist_ok=True)
        (self.directory / str(step)).rename(aside)
      distributed.barrier(f"checkpoint step {step} moved aside")
      self._manager.reload()
    return aside

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` (default latest) into the structure and shardings of `target`.

    With `target=None` the saved tree comes back as nested dicts on the first local device,
    whatever topology saved it (a TPU-pod checkpoint loads on a laptop).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {str(self.directory)!r}")
    problem = integrity_problem(self.directory / str(step))
    if problem is not None:
      raise CheckpointError(f"checkpoint {str(self.directory / str(step))!r} is corrupt: "
                            f"{problem}")
    return self._restore_checked(target, step)

  def _restore_checked(self, target: Any, step: int) -> tuple[Any, dict[str, Any]]:
    """`restore` of a step whose files have passed (or predate) the integrity check."""
    try:
      if target is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
            self._manager.item_metadata(step)["state"])
      else:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for missing/corrupt files.
      raise CheckpointError(
          f"checkpoint {str(self.directory / str(step))!r} is corrupt or incompatible: "
          f"{short_reason(e)}") from None
    return restored.state, dict(restored.meta)

  def close(self) -> None:
    with interrupts.deferred():
      self._manager.close()


def _resolve(path: str | Path) -> tuple[Path, int | None]:
  """Maps a workdir, checkpoint directory or single step directory to (directory, step)."""
  path = Path(path).expanduser().absolute()
  if not path.exists():
    raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
  if not path.is_dir():
    raise CheckpointError(f"checkpoint path {str(path)!r} is a file; name a training run's "
                          f"workdir, its '{CHECKPOINT_DIR}' folder or a step folder inside it")
  if (path / CHECKPOINT_DIR).is_dir():
    return path / CHECKPOINT_DIR, None
  if path.name.isdigit() and (path / "state").exists():
    return path.parent, int(path.name)
  if any(child.name.isdigit() for child in path.iterdir()):
    return path, None
  raise CheckpointError(
      f"no checkpoint in {str(path)!r}: expected a workdir, its '{CHECKPOINT_DIR}' folder or a "
      "step folder inside it")


def checkpoint_step(path: str | Path) -> int | None:
  """The step `load_checkpoint(path)` would load (a step folder's, else the latest), or None."""
  directory, step = _resolve(path)
  if step is not None:
    return step
  checkpointer = Checkpointer(directory)
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads `{'params', 'batch_stats'}` and the model metadata from another run's checkpoint.

  Args:
    path: a workdir, its `checkpoints` folder, or one step folder (`.../checkpoints/1200`).
  Returns:
    (variables, meta): variables ready for `model.apply`; meta as saved by the trainer.
  """
  directory, step = _resolve(path)
  checkpointer = Checkpointer(directory)
  try:
    step = checkpointer.latest_step() if step is None else step
    state, meta = checkpointer.restore(None, step)
  finally:
    checkpointer.close()
  if not isinstance(state, dict) or "params" not in state:
    raise CheckpointError(f"checkpoint in {str(directory)!r} holds no model parameters")
  logging.info("Loaded checkpoint %s (step %s).", directory, step)
  return {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}, meta


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
  """Rebuilds the flax module described by a checkpoint's metadata."""
  return create_model(ml_collections.ConfigDict(meta["model"]), meta["num_classes"],
                      meta["mean"], meta["std"])

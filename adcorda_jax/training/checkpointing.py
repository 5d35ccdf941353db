"""Orbax checkpoints: periodic saves of the train state, resume, and loading a model by path.

Each checkpoint holds two items: `state` (params, BatchNorm statistics, optimizer state, step) and
`meta` (JSON: how to rebuild the model: model config, number of classes, normalization constants,
image shape, dataset). `meta` is what lets a later stage (attacks, AdCorDA, compression) load a
trained baseline from another run's workdir without that run's config.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from adcorda_jax.errors import CheckpointError
from adcorda_jax.models import create_model

CHECKPOINT_DIR = "checkpoints"


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
    """Writes checkpoint `step` atomically (orbax renames a finished temporary directory)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Restores checkpoint `step` (default latest) into the structure and shardings of `target`.

    With `target=None` the saved tree comes back as nested dicts on the first local device,
    whatever topology saved it (a TPU-pod checkpoint loads on a laptop).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint found in {str(self.directory)!r}")
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
      message = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise CheckpointError(
          f"checkpoint {str(self.directory / str(step))!r} is corrupt or incompatible: "
          f"{message[:200]}") from None
    return restored.state, dict(restored.meta)

  def close(self) -> None:
    self._manager.close()


def _resolve(path: str | Path) -> tuple[Path, int | None]:
  """Maps a workdir, checkpoint directory or single step directory to (directory, step)."""
  path = Path(path).expanduser().absolute()
  if not path.exists():
    raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
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
    state, meta = checkpointer.restore(None, step)
  finally:
    checkpointer.close()
  if not isinstance(state, dict) or "params" not in state:
    raise CheckpointError(f"checkpoint in {str(directory)!r} holds no model parameters")
  logging.info("Loaded checkpoint %s (step %s).", directory, meta.get("step"))
  return {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}, meta


def model_from_meta(meta: dict[str, Any]) -> nn.Module:
  """Rebuilds the flax module described by a checkpoint's metadata."""
  return create_model(ml_collections.ConfigDict(meta["model"]), meta["num_classes"],
                      meta["mean"], meta["std"])

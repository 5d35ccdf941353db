"""The resumable step loop shared by fine-tuning (AdCorDA, QAT, pruning) and distillation.

Restores the newest readable orbax checkpoint in `<directory>/checkpoints` (or starts at step 0),
runs the remaining steps, logs averaged metrics to `metrics.jsonl` and the progress line, stops
with a one-line TrainingError naming the first step whose loss or parameters are not finite, and
checkpoints every `checkpoint_every` steps, at the end, and once on SIGINT/SIGTERM. A run's
batches are pure functions of the step, so a resumed run follows exactly the trajectory of an
uninterrupted one. `task=train` shares the helpers below (restore, divergence, interrupt save).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from adcorda_jax import faults, interrupts
from adcorda_jax.errors import TrainingError
from adcorda_jax.progress import Progress
from adcorda_jax.reporting import metrics_log
from adcorda_jax.training import checkpointing

# (state, step index from 0) -> (new state, metrics incl. `loss` and `params_finite`).
StepFn = Callable[[Any, int], tuple[Any, dict[str, jax.Array]]]
StepCallback = Callable[[int, Any], None]


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How long a run is and how often it logs and checkpoints."""
  total_steps: int
  steps_per_epoch: int
  log_every_steps: int
  checkpoint_every_steps: int  # 0 = once per epoch.
  max_checkpoints: int
  divergence_hint: str         # What to lower when the loss diverges, e.g. "adapt.learning_rate".

  @classmethod
  def of(cls, settings: Any, total_steps: int, steps_per_epoch: int, divergence_hint: str
         ) -> "LoopSettings":
    """From a validated config section with `log_every_steps`, `checkpoint_every_steps` and
    `max_checkpoints` (AdaptSettings, DistillSettings)."""
    return cls(total_steps=total_steps, steps_per_epoch=steps_per_epoch,
               log_every_steps=settings.log_every_steps,
               checkpoint_every_steps=settings.checkpoint_every_steps,
               max_checkpoints=settings.max_checkpoints, divergence_hint=divergence_hint)


@dataclasses.dataclass(frozen=True)
class LoopResult:
  state: Any
  resumed_from_step: int
  final_metrics: dict[str, float]


def mean_metrics(pending: list[dict[str, jax.Array]], first_step: int, directory: Path,
                 what: str, hint: str, last_good: int | None) -> dict[str, float]:
  """Averages per-step metrics on the host, after checking every step's loss and parameters.

  `pending[i]` is step `first_step + i`; a non-finite one is a one-line TrainingError naming the
  first such step and the last good checkpoint (`last_good`), which is kept.
  """
  stacked = check_finite(pending, first_step, directory, what, hint, last_good)
  averaged = {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
  del averaged["params_finite"]
  return averaged


def check_finite(pending: list[dict[str, jax.Array]], first_step: int, directory: Path,
                 what: str, hint: str, last_good: int | None) -> list[dict[str, Any]]:
  """The per-step metrics on the host, after checking that every step's loss and parameters
  are finite (see `mean_metrics`); one scalar per step, fetched once per log or save."""
  stacked = jax.device_get(pending)
  for offset, metrics in enumerate(stacked):
    finite = all(np.isfinite(value) for value in metrics.values())
    if not finite or metrics["params_finite"] != 1:
      kept = (f"the last good checkpoint (step {last_good}) is kept"
              if last_good is not None else "no checkpoint was written")
      raise TrainingError(f"{what} in {str(directory)!r} diverged at step {first_step + offset} "
                          f"(loss={float(metrics['loss'])}); {kept}; lower {hint}")
  return stacked


def restore(checkpointer: checkpointing.Checkpointer, state: Any) -> Any:
  """The newest readable checkpoint restored into `state`'s structure, or `state` if none."""
  restored = checkpointer.restore_latest_good(state)
  if restored is None:
    return state
  logging.info("Resuming from checkpoint at step %d.", restored[2])
  return restored[0]


def save_on_interrupt(interrupt: KeyboardInterrupt, checkpointer: checkpointing.Checkpointer,
                      state: Any, meta: dict[str, Any]) -> None:
  """Saves the current state once on SIGINT/SIGTERM, if it is intact, finite and not saved yet.

  What was saved is noted on `interrupt` for the one line `main.py` prints (and logged when
  the interrupt is a plain KeyboardInterrupt, e.g. in a notebook).
  """
  try:
    step = int(state.step)
    finite = all(bool(np.isfinite(leaf).all()) for leaf in jax.device_get(
        jax.tree.leaves(state.params)))
  except RuntimeError:  # Its buffers were donated to a step that never finished.
    step, finite = -1, False
  latest = checkpointer.latest_step()
  if finite and step > 0 and step != latest:  # Step 0 is the initial state: nothing to keep.
    checkpointer.save(step, state, meta)
    latest = step
  saved = (f"step {latest} is saved in {str(checkpointer.directory)!r}" if latest is not None
           else "no checkpoint was saved")
  interrupts.record_save(interrupt, saved)
  if not isinstance(interrupt, interrupts.Interrupted):
    logging.warning("Interrupted: %s; rerun the same command to resume.", saved)


def run_resumable(state: Any, step_fn: StepFn, *, loop: LoopSettings, directory: Path,
                  meta: dict[str, Any], description: str, what: str,
                  progress_keys: tuple[str, ...] = ("loss", "accuracy"),
                  start_message: str = "", step_callback: StepCallback | None = None
                  ) -> LoopResult:
  """Runs `step_fn` from the latest checkpoint in `directory` to `loop.total_steps`.

  `state` is the initial (replicated) train state; `meta` is saved with every checkpoint;
  `start_message` is logged with the step counts when there is work left.
  """
  directory.mkdir(parents=True, exist_ok=True)
  checkpointer = checkpointing.Checkpointer(directory / checkpointing.CHECKPOINT_DIR,
                                            loop.max_checkpoints)
  state = restore(checkpointer, state)
  start_step = int(state.step)
  log = metrics_log.MetricsLog(directory / "metrics.jsonl")
  log.truncate_after(start_step)
  total_steps = loop.total_steps
  if start_step < total_steps:
    logging.info("%s: %d steps (%d done)%s.", description, total_steps, start_step,
                 f" {start_message}" if start_message else "")
  checkpoint_every = loop.checkpoint_every_steps or loop.steps_per_epoch
  progress = Progress(total_steps, description, initial=start_step)
  pending: list[dict[str, jax.Array]] = []
  last: dict[str, float] = {}
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, metrics = step_fn(state, step - 1)
      pending.append(metrics)
      save_now = step % checkpoint_every == 0 or step == total_steps
      if step % loop.log_every_steps == 0 or save_now:
        last = mean_metrics(pending, step - len(pending) + 1, directory, what,
                            loop.divergence_hint, checkpointer.latest_step())
        pending = []
        log.write({"step": step, "epoch": step / loop.steps_per_epoch, **last})
        progress.update(0, **{key: last[key] for key in progress_keys if key in last})
      if save_now:
        checkpointer.save(step, state, meta)
      progress.update(1)
      if step_callback is not None:
        step_callback(step, state)
      faults.point("train_step")
  except KeyboardInterrupt as interrupt:
    save_on_interrupt(interrupt, checkpointer, state, meta)
    raise
  finally:
    progress.close()
    checkpointer.close()
  return LoopResult(state=state, resumed_from_step=start_step, final_metrics=last)

"""The one resumable training loop: task=train, fine-tuning (AdCorDA, QAT, pruning), distillation.

Restores the newest readable orbax checkpoint in `<directory>/checkpoints` (or starts at step 0),
runs the remaining steps, logs averaged metrics to `metrics.jsonl` and the progress line, stops
with a one-line TrainingError naming the first step whose loss or parameters are not finite, and
checkpoints every `checkpoint_every` steps, at the end, and once on SIGINT/SIGTERM. A run's
batches are pure functions of the step, so a resumed run follows exactly the trajectory of an
uninterrupted one. With an epoch hook it validates at each epoch's end; with `examples_per_step`
it measures training throughput.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from adcorda_jax import config_checks, faults, interrupts, workdir as workdir_lib
from adcorda_jax.errors import TrainingError
from adcorda_jax.progress import Progress
from adcorda_jax.training import metrics_log
from adcorda_jax.training import checkpointing

# (state, step index from 0) -> (new state, metrics incl. `loss` and `params_finite`).
StepFn = Callable[[Any, int], tuple[Any, dict[str, jax.Array]]]
StepCallback = Callable[[int, Any], None]  # (step, state) after each step: tests, notebooks.
EpochHook = Callable[[int, Any], "dict[str, float] | None"]  # (step, state) -> metrics to log.


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How long a run is and how often it logs and checkpoints."""
  total_steps: int
  steps_per_epoch: int
  log_every_steps: int
  checkpoint_every_steps: int  # 0 = once per epoch.
  max_checkpoints: int
  divergence_hint: str         # What to lower when the loss diverges, e.g. "adapt.learning_rate".
  examples_per_step: int = 0   # > 0: log and return throughput (examples per second).

  @classmethod
  def of(cls, settings: Any, total_steps: int, steps_per_epoch: int, divergence_hint: str
         ) -> "LoopSettings":
    """From a validated config section with `log_every_steps`, `checkpoint_every_steps` and
    `max_checkpoints` (FinetuneSettings, DistillSettings)."""
    return cls(total_steps=total_steps, steps_per_epoch=steps_per_epoch,
               log_every_steps=settings.log_every_steps,
               checkpoint_every_steps=settings.checkpoint_every_steps,
               max_checkpoints=settings.max_checkpoints, divergence_hint=divergence_hint)


@dataclasses.dataclass(frozen=True)
class LoopResult:
  state: Any
  resumed_from_step: int
  final_metrics: dict[str, float]
  examples_per_second: float | None = None  # With `LoopSettings.examples_per_step`.


def read_cadence(section: Any, prefix: str) -> dict[str, int]:
  """`log_every_steps`, `checkpoint_every_steps` (0 = per epoch) and `max_checkpoints` of a
  loop's config section, checked with one-line ConfigErrors naming `<prefix>.<key>`."""
  return {
      "log_every_steps": config_checks.positive_int(section, "log_every_steps", prefix,
                                                    default=50),
      "checkpoint_every_steps": config_checks.positive_int(
          section, "checkpoint_every_steps", prefix, default=0, allow_zero=True),
      "max_checkpoints": config_checks.positive_int(section, "max_checkpoints", prefix,
                                                    default=2)}


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
  the interrupt is a plain KeyboardInterrupt, e.g. in a notebook). A multi-process run does not
  save here (a save is a collective of every process, which may have been interrupted at
  different steps, or alone): its last periodic checkpoint is kept.
  """
  try:
    step = int(state.step)
    finite = all(bool(np.isfinite(leaf).all()) for leaf in jax.device_get(
        jax.tree.leaves(state.params)))
  except RuntimeError:  # Its buffers were donated to a step that never finished.
    step, finite = -1, False
  latest = checkpointer.latest_step()
  if finite and step > 0 and step != latest and jax.process_count() == 1:  # Step 0: initial.
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
                  start_message: str = "", step_callback: StepCallback | None = None,
                  on_restored: Callable[[int], None] | None = None,
                  epoch_end: EpochHook | None = None) -> LoopResult:
  """Runs `step_fn` from the latest checkpoint in `directory` to `loop.total_steps`.

  `state` is the initial (replicated) train state; `meta` is saved with every checkpoint;
  `start_message` is logged with the step counts when there is work left. `on_restored(step)`
  runs once the checkpoint is restored, before any step (task=train claims its workdir there:
  a checkpoint that does not fit must fail before the claim). `epoch_end(step, state)` runs at
  each epoch's end (validation); the metrics it returns are logged. Throughput counts training
  steps only: not the first (compiling) step, epoch hooks or saves.
  """
  workdir_lib.makedirs(directory)  # The writer's; orbax waits for its folders on the others.
  checkpointer = checkpointing.Checkpointer(directory / checkpointing.CHECKPOINT_DIR,
                                            loop.max_checkpoints)
  state = restore(checkpointer, state)
  start_step = int(state.step)
  if on_restored is not None:
    on_restored(start_step)
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
  clock = _Throughput()
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, metrics = step_fn(state, step - 1)
      pending.append(metrics)
      clock.stepped(metrics)
      end_of_epoch = epoch_end is not None and step % loop.steps_per_epoch == 0
      save_now = step % checkpoint_every == 0 or step == total_steps
      if step % loop.log_every_steps == 0 or save_now or end_of_epoch:
        last = mean_metrics(pending, step - len(pending) + 1, directory, what,
                            loop.divergence_hint, checkpointer.latest_step())
        pending = []
        rate = ({"examples_per_second": clock.rate(loop.examples_per_step)}
                if loop.examples_per_step else {})
        log.write({"step": step, "epoch": step / loop.steps_per_epoch, **last, **rate})
        progress.update(0, **{key: last[key] for key in progress_keys if key in last})
      if end_of_epoch or save_now:
        with clock.overhead(state):
          if end_of_epoch:
            _log_epoch(log, step, loop.steps_per_epoch, epoch_end(step, state))
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
  seconds = clock.seconds()
  return LoopResult(
      state=state, resumed_from_step=start_step, final_metrics=last,
      examples_per_second=(clock.timed_steps * loop.examples_per_step / seconds
                           if seconds and loop.examples_per_step else None))


def _log_epoch(log: metrics_log.MetricsLog, step: int, steps_per_epoch: int,
               metrics: dict[str, float] | None) -> None:
  if metrics is None:
    return
  epoch = step // steps_per_epoch
  log.write({"step": step, "epoch": epoch, **metrics})
  logging.info("epoch %d: %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


class _Throughput:
  """Seconds of training steps: from the end of the first (compiling) step, less overheads."""

  def __init__(self):
    self.start: float | None = None
    self.timed_steps = 0
    self.excluded = 0.0

  def stepped(self, metrics: dict[str, jax.Array]) -> None:
    if self.start is None:
      jax.block_until_ready(metrics)
      self.start = time.perf_counter()
    else:
      self.timed_steps += 1

  def seconds(self) -> float:
    return time.perf_counter() - self.start - self.excluded if self.start is not None else 0.0

  def rate(self, examples_per_step: int) -> float:
    return self.timed_steps * examples_per_step / max(self.seconds(), 1e-9)

  @contextlib.contextmanager
  def overhead(self, state: Any) -> Iterator[None]:
    """Excludes the block's time; steps still in flight finish first and count as training."""
    jax.block_until_ready(state)
    began = time.perf_counter()
    try:
      yield
    finally:
      self.excluded += time.perf_counter() - began

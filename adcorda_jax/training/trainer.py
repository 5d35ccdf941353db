"""`task=train`: train a classifier, evaluate it, and write its artifacts to the workdir.

The loop is restore-or-initialize: the same command on the same workdir resumes from the latest
checkpoint, and a finished run returns its saved results instead of training again.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from adcorda_jax import config_checks, faults, workdir as workdir_lib
from adcorda_jax.data import Dataset, load_dataset
from adcorda_jax.errors import ConfigError
from adcorda_jax.models import count_params, create_model
from adcorda_jax.progress import Progress
from adcorda_jax.quant.deploy import quantization_from_config
from adcorda_jax.reporting import metrics_log, plots, report
from adcorda_jax.training import (batches, checkpointing, evaluation, optim, resumable, sharding,
                                  steps)

StepCallback = Callable[[int, steps.TrainState], None]
# Raising these on a workdir continues its run from the last checkpoint, with the learning-rate
# schedule of the new length from there on (so not equal to a fresh run of that length unless
# the schedule is constant); results.json records the old values as `extended_from`.
EXTENDABLE_KEYS = frozenset({"train.epochs"})


def model_meta(config: ml_collections.ConfigDict, dataset: Dataset) -> dict[str, Any]:
  """What a later stage needs to rebuild the model from a checkpoint alone."""
  return {
      "model": config.model.to_dict(),
      "num_classes": dataset.num_classes,
      "mean": list(dataset.mean),
      "std": list(dataset.std),
      "image_shape": list(dataset.image_shape),
      "dataset": dataset.name,
      "class_names": list(dataset.class_names),
  }


def _validate(train_config: ml_collections.ConfigDict) -> None:
  for key in ("epochs", "batch_size", "eval_batch_size", "log_every_steps", "max_checkpoints"):
    config_checks.positive_int(train_config, key, "train")
  config_checks.positive_int(train_config, "checkpoint_every_steps", "train", allow_zero=True)
  config_checks.fraction(train_config, "label_smoothing", "train")
  config_checks.positive_int(train_config, "augment_padding", "train", allow_zero=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       step_callback: StepCallback | None = None) -> dict[str, Any]:
  """Trains `config.model` on `config.data`, evaluates it and writes the run's artifacts.

  Args:
    config: the full experiment config (see configs/train_digits.py).
    workdir: run directory; an existing run there is resumed or, if finished, returned; with
      a larger `train.epochs` a finished or interrupted run is continued.
    step_callback: called as `step_callback(step, state)` after each step (tests, notebooks).
  Returns:
    The results dict, also saved as `<workdir>/results.json`.
  """
  with workdir_lib.open_run(workdir, config, extendable=EXTENDABLE_KEYS) as run:
    if run.finished is not None:
      return run.finished
    return _train(config, run, step_callback)


def _train(config: ml_collections.ConfigDict, run: workdir_lib.Run,
           step_callback: StepCallback | None) -> dict[str, Any]:
  wall_start = time.perf_counter()
  workdir = run.path
  train_config = config.train
  _validate(train_config)
  if quantization_from_config(config.get("model")) is not None:
    raise ConfigError(f"model.quant.weight_bits={config.model.quant.weight_bits}: task=train "
                      "trains float models; quantize a trained one with task=quantize (PTQ, QAT) "
                      "or task=adcorda")

  dataset = load_dataset(config.data, config.seed)
  model = create_model(config.model, dataset.num_classes, dataset.mean, dataset.std)
  mesh = sharding.make_mesh()
  batch_size, eval_batch_size = train_config.batch_size, train_config.eval_batch_size
  sharding.check_divisible(batch_size, "train.batch_size", mesh)
  sharding.check_divisible(eval_batch_size, "train.eval_batch_size", mesh)
  num_train = len(dataset.train)
  steps_per_epoch = batches.steps_per_epoch(num_train, batch_size)
  total_steps = train_config.epochs * steps_per_epoch
  schedule = optim.make_schedule(train_config, total_steps, steps_per_epoch)
  tx = optim.make_optimizer(train_config, schedule)

  init_rng, train_rng = jax.random.split(jax.random.key(config.seed))
  replicated = sharding.replicated(mesh)
  train_rng = jax.device_put(train_rng, replicated)
  state = jax.jit(functools.partial(steps.create_train_state, model=model,
                                    image_shape=dataset.image_shape, tx=tx),
                  out_shardings=replicated)(init_rng)
  checkpointer = checkpointing.Checkpointer(workdir / checkpointing.CHECKPOINT_DIR,
                                            train_config.max_checkpoints)
  meta = model_meta(config, dataset)
  state = resumable.restore(checkpointer, state)
  start_step = int(state.step)
  run.claim()  # Everything checkable before work is checked: config, data, mesh, checkpoint.
  log = metrics_log.MetricsLog(workdir / "metrics.jsonl")
  log.truncate_after(start_step)

  augment = bool(config.data.get("augment", False))
  train_step = jax.jit(
      functools.partial(
          steps.train_step, num_classes=dataset.num_classes,
          label_smoothing=train_config.label_smoothing,
          augment_padding=train_config.augment_padding if augment else None,
          learning_rate_fn=schedule),
      in_shardings=(replicated, sharding.batch_sharded(mesh), replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)
  eval_fn = steps.make_eval_fn(model.apply, dataset.num_classes)
  evaluate = functools.partial(evaluation.evaluate_split, eval_fn,
                               batch_size=eval_batch_size, mesh=mesh)
  checkpoint_every = train_config.checkpoint_every_steps or steps_per_epoch
  logging.info("Training %s on %s: %d examples, %d steps (%d/epoch) on %d device(s).",
               config.model.name, dataset.name, num_train, total_steps, steps_per_epoch,
               mesh.devices.size)

  progress = Progress(total_steps, "train", initial=start_step)
  pending: list[dict[str, jax.Array]] = []

  def divergence(step: int) -> tuple[int, Path, str, str, int | None]:
    """What a divergence message names: first pending step, where, hint, last good step."""
    return (step - len(pending) + 1, workdir, "training",
            "train.learning_rate or check the data", checkpointer.latest_step())

  # Throughput counts training steps only: not the first (compiling) step, evals or saves.
  timed_start, timed_steps, overhead = None, 0, 0.0
  try:
    for step in range(start_step + 1, total_steps + 1):
      indices = batches.train_batch_indices(num_train, batch_size, step - 1, config.seed)
      batch = sharding.put_batch(
          {"image": dataset.train.images[indices], "label": dataset.train.labels[indices]}, mesh)
      state, metrics = train_step(state, batch, train_rng)
      pending.append(metrics)
      if timed_start is None:
        jax.block_until_ready(metrics)
        timed_start = time.perf_counter()
      else:
        timed_steps += 1
      end_of_epoch = step % steps_per_epoch == 0
      save_now = step % checkpoint_every == 0 or step == total_steps
      if step % train_config.log_every_steps == 0 or end_of_epoch or step == total_steps:
        averaged = resumable.mean_metrics(pending, *divergence(step))
        pending = []
        rate = timed_steps * batch_size / max(time.perf_counter() - timed_start - overhead, 1e-9)
        log.write({"step": step, "epoch": step / steps_per_epoch, **averaged,
                   "examples_per_second": rate})
        progress.update(0, loss=averaged["loss"], accuracy=averaged["accuracy"])
      if end_of_epoch or save_now:
        jax.block_until_ready(state)  # In-flight training steps count as training time.
        overhead_start = time.perf_counter()
        if end_of_epoch:
          val = evaluate({"params": state.params, "batch_stats": state.batch_stats},
                         dataset.val.images, dataset.val.labels)
          if val is not None:
            log.write({"step": step, "epoch": step // steps_per_epoch,
                       "val_accuracy": val["accuracy"], "val_loss": val["loss"]})
            logging.info("epoch %d: val_accuracy=%.4f val_loss=%.4f",
                         step // steps_per_epoch, val["accuracy"], val["loss"])
        if save_now:
          if pending:  # Steps since the last log: never checkpoint a diverged state.
            resumable.check_finite(pending, *divergence(step))
          checkpointer.save(step, state, meta)
        overhead += time.perf_counter() - overhead_start
      progress.update(1)
      if step_callback is not None:
        step_callback(step, state)
      faults.point("train_step")
  except KeyboardInterrupt as interrupt:
    resumable.save_on_interrupt(interrupt, checkpointer, state, meta)
    raise
  finally:
    progress.close()
  train_seconds = time.perf_counter() - timed_start - overhead if timed_start else 0.0

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  split_metrics = {name: evaluate(variables, split.images, split.labels)
                   for name, split in (("train", dataset.train), ("val", dataset.val),
                                       ("test", dataset.test))}
  results: dict[str, Any] = {
      "status": "complete",
      "task": config.task,
      "dataset": dataset.name,
      "model": config.model.name,
      "params": count_params(state.params),
      "steps": total_steps,
      "resumed_from_step": start_step,
      **({"extended_from": run.extended_from} if run.extended_from else {}),
      "devices": mesh.devices.size,
      "backend": jax.default_backend(),
      "wall_seconds": time.perf_counter() - wall_start,
      "examples_per_second": timed_steps * batch_size / train_seconds if train_seconds else None,
      "checkpoint": str(checkpointer.directory),
      "config": workdir_lib.config_to_dict(config),
  }
  for name, metrics in split_metrics.items():
    results[f"{name}_accuracy"] = metrics["accuracy"] if metrics else None
    results[f"{name}_loss"] = metrics["loss"] if metrics else None
    results[f"{name}_examples"] = metrics["count"] if metrics else 0
  checkpointer.close()
  if workdir_lib.is_writer():
    plots.plot_training_curves(log.read(), workdir / "training_curves.png",
                               title=f"{config.model.name} on {dataset.name}")
    workdir_lib.write_text_atomic(workdir / "report.md", report.training_report(results))
  workdir_lib.write_json_atomic(workdir / workdir_lib.RESULTS_FILE, results)
  logging.info("Done: test_accuracy=%.4f, results in %s", results["test_accuracy"] or float("nan"),
               workdir / workdir_lib.RESULTS_FILE)
  return results

"""`task=train`: train a classifier, evaluate it, and write its artifacts to the workdir.

The loop is restore-or-initialize: the same command on the same workdir resumes from the latest
checkpoint, and a finished run returns its saved results instead of training again.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, TypedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from adcorda_jax import config_checks, pipeline
from adcorda_jax.data import Dataset, load_dataset
from adcorda_jax.errors import ConfigError
from adcorda_jax.models import count_params, create_model
from adcorda_jax.quant.deploy import quantization_from_config
from adcorda_jax.reporting import plots, report
from adcorda_jax.training import (batches, checkpointing, evaluation, input_pipeline, metrics_log,
                                  optim, resumable, sharding, steps)

# Raising these on a workdir continues its run from the last checkpoint, with the learning-rate
# schedule of the new length from there on (so not equal to a fresh run of that length unless
# the schedule is constant); results.json records the old values as `extended_from`.
EXTENDABLE_KEYS = frozenset({"train.epochs"})
# train.compute_dtype -> the dtype the training forward and backward passes compute in.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainResults(TypedDict, total=False):
  """`results.json` of task=train (besides the envelope: status, task, devices, config...)."""
  dataset: str
  model: str
  params: int
  steps: int
  resumed_from_step: int
  examples_per_second: float | None    # Training steps only (not compile, eval, saves).
  checkpoint: str
  train_accuracy: float | None         # And val_/test_: accuracy, loss, examples.


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
  config_checks.one_of(train_config, "compute_dtype", "train", tuple(COMPUTE_DTYPES),
                       default="float32")


def with_compute_dtype(model: nn.Module, train_config: ml_collections.ConfigDict) -> nn.Module:
  """`model` computing in `train.compute_dtype` (float32 default, or bfloat16).

  Only the compute dtype changes: parameters, optimizer state, BatchNorm statistics, logits and
  the loss stay float32, so the trained variables are those of the float32 `model` and every
  evaluation, attack and later stage uses them unchanged.
  """
  name = config_checks.one_of(train_config, "compute_dtype", "train", tuple(COMPUTE_DTYPES),
                              default="float32")
  dtype = COMPUTE_DTYPES[name]
  return model if dtype == jnp.float32 else model.clone(dtype=dtype)  # float32: as built.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       step_callback: resumable.StepCallback | None = None) -> dict[str, Any]:
  """Trains `config.model` on `config.data`, evaluates it and writes the run's artifacts.

  Args:
    config: the full experiment config (see configs/train_digits.py).
    workdir: run directory; an existing run there is resumed or, if finished, returned; with
      a larger `train.epochs` a finished or interrupted run is continued.
    step_callback: called as `step_callback(step, state)` after each step (tests, notebooks).
  Returns:
    The results dict, also saved as `<workdir>/results.json`.
  """
  with pipeline.open_run(workdir, config, task=config.get("task", "train"),
                         extendable=EXTENDABLE_KEYS) as run:
    if run.finished is not None:
      return run.finished
    return _train(config, run, step_callback)


def _train(config: ml_collections.ConfigDict, run: pipeline.Run,
           step_callback: resumable.StepCallback | None) -> dict[str, Any]:
  workdir = run.path
  train_config = config.train
  _validate(train_config)
  if quantization_from_config(config.get("model")) is not None:
    raise ConfigError(f"model.quant.weight_bits={config.model.quant.weight_bits}: task=train "
                      "trains float models; quantize a trained one with task=quantize (PTQ, QAT) "
                      "or task=adcorda")

  dataset = load_dataset(config.data, config.seed)
  model = create_model(config.model, dataset.num_classes, dataset.mean, dataset.std)
  train_model = with_compute_dtype(model, train_config)  # Evaluation keeps `model` (float32).
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
  train_rng = sharding.replicate(train_rng, mesh)
  state = jax.jit(functools.partial(steps.create_train_state, model=train_model,
                                    image_shape=dataset.image_shape, tx=tx),
                  out_shardings=replicated)(init_rng)
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

  stream = input_pipeline.BatchStream(
      {"image": dataset.train.images, "label": dataset.train.labels}, batch_size, config.seed,
      mesh, input_pipeline.settings_from_config(config))

  def step_fn(state: steps.TrainState, index: int) -> tuple[steps.TrainState, dict]:
    return train_step(state, stream(index), train_rng)

  def validate(step: int, state: steps.TrainState) -> dict[str, float] | None:
    val = evaluate({"params": state.params, "batch_stats": state.batch_stats},
                   dataset.val.images, dataset.val.labels)
    return None if val is None else {"val_accuracy": val["accuracy"], "val_loss": val["loss"]}

  logging.info("Training %s on %s: %d examples, %d steps (%d/epoch) on %d device(s).",
               config.model.name, dataset.name, num_train, total_steps, steps_per_epoch,
               mesh.devices.size)
  loop = resumable.LoopSettings(
      total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      log_every_steps=train_config.log_every_steps,
      checkpoint_every_steps=train_config.checkpoint_every_steps,
      max_checkpoints=train_config.max_checkpoints,
      divergence_hint="train.learning_rate or check the data", examples_per_step=batch_size)
  # The claim waits for the restore: a checkpoint that does not fit fails before it.
  with stream:
    outcome = resumable.run_resumable(
        state, step_fn, loop=loop, directory=workdir, meta=model_meta(config, dataset),
        description="train", what="training", step_callback=step_callback,
        on_restored=lambda _: run.claim(), epoch_end=validate)
  state = outcome.state

  variables = {"params": state.params, "batch_stats": state.batch_stats}
  results = run.results(**TrainResults(
      dataset=dataset.name, model=config.model.name, params=count_params(state.params),
      steps=total_steps, resumed_from_step=outcome.resumed_from_step,
      examples_per_second=outcome.examples_per_second,
      checkpoint=str((workdir / checkpointing.CHECKPOINT_DIR).absolute())))
  for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)):
    metrics = evaluate(variables, split.images, split.labels)
    results[f"{name}_accuracy"] = metrics["accuracy"] if metrics else None
    results[f"{name}_loss"] = metrics["loss"] if metrics else None
    results[f"{name}_examples"] = metrics["count"] if metrics else 0
  log = metrics_log.MetricsLog(workdir / "metrics.jsonl")
  return run.finish(
      results, report=report.training_report(results),
      summary=f"test_accuracy={results['test_accuracy'] or float('nan'):.4f}",
      plots=[lambda: plots.plot_training_curves(log.read(), workdir / "training_curves.png",
                                                title=f"{config.model.name} on {dataset.name}")])

"""Fine-tune a trained classifier on a source set, optionally aligned to an unlabelled target set.

Used by AdCorDA's stage 2 (domain adaptation) and its controls, quantization-aware fine-tuning and
the compression study's pruning fine-tuning; the `adapt` config section drives it. One jitted step
computes cross-entropy on a labelled source batch plus `lambda_ * alignment(source_features,
target_features)` on the penultimate features of a source and an (unlabelled) target batch; the
alignment loss is the caller's (AdCorDA's CORAL lives in `adcorda.alignment`), and without one the
target pass is skipped. The loop is `training.resumable`'s: batch `step` of either stream is a
pure function of (seed, stream, step) (`training.batches`), so an interrupted run resumes from its
latest orbax checkpoint onto exactly the trajectory an uninterrupted run follows.

BatchNorm (`adapt.batch_norm`): "train" runs both passes in train mode (batch statistics) and
updates the running statistics from the source batches only; "frozen" runs the model in eval mode
(running statistics, no dropout), so only the parameters move.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from adcorda_jax import config_checks
from adcorda_jax.errors import ConfigError
from adcorda_jax.models import fast_path
from adcorda_jax.training import (input_pipeline, optim, resumable, sharding, steps,
                                  trainable)

PREFIX = "adapt"
BATCH_NORM_MODES = ("train", "frozen")
SOURCE_STREAM, TARGET_STREAM = 1, 2  # Independent batch orders drawn from one seed.

# Keys read only by an aligned fine-tuning (AdCorDA's stage 2 `adcorda` variant): the
# cross-entropy-only runs (controls, QAT, pruning and study fine-tuning) leave them out of their
# fingerprints, so changing them redoes only the runs that use them. Records of earlier versions
# hold them in every run; those still match (`pipeline.Stage.retired_keys`).
ALIGNMENT_KEYS = frozenset({"adapt.alignment", "adapt.lambda_"})


def without_alignment(fingerprint: dict[str, Any]) -> dict[str, Any]:
  """`fingerprint` for a run that does not read the alignment keys."""
  return {k: v for k, v in fingerprint.items() if k not in ALIGNMENT_KEYS}


Arrays = tuple[np.ndarray, np.ndarray]  # (images, labels)
# (source features, target features) -> scalar; e.g. `adcorda.alignment.coral_loss`.
AlignmentLoss = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
  """The validated `config.adapt` section (the optimizer fields stay in `optimizer`).

  The alignment keys (`adapt.alignment`, `adapt.lambda_`) are AdCorDA's, read by
  `adcorda.settings`; every other fine-tuning reads only these.
  """
  epochs: int
  batch_size: int
  trainable: str
  batch_norm: str
  log_every_steps: int
  checkpoint_every_steps: int
  max_checkpoints: int
  optimizer: ml_collections.ConfigDict


def read_finetune_settings(config: ml_collections.ConfigDict) -> FinetuneSettings:
  """Checks `config.adapt`; one-line ConfigErrors name `adapt.<key>`."""
  section = config.get(PREFIX)
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError("config has no 'adapt' section; start from configs/adcorda_digits.py")
  # make_optimizer/make_schedule name `train.*` in their errors: check the same fields here first.
  optim.check_optimizer_fields(section, PREFIX)
  pattern = section.get("trainable", "")
  if not isinstance(pattern, str):
    raise ConfigError(f"{PREFIX}.trainable must be a regular expression string, got {pattern!r}")
  try:
    re.compile(pattern)  # Whether it matches any parameter is checked once params exist.
  except re.error as e:
    raise ConfigError(f"{PREFIX}.trainable={pattern!r} is not a valid regular expression: "
                      f"{e}") from None
  return FinetuneSettings(
      epochs=config_checks.positive_int(section, "epochs", PREFIX),
      batch_size=config_checks.positive_int(section, "batch_size", PREFIX),
      trainable=pattern,
      batch_norm=config_checks.one_of(section, "batch_norm", PREFIX, BATCH_NORM_MODES,
                                      default="train"),
      **resumable.read_cadence(section, PREFIX),
      optimizer=section)


def stream_seed(seed: int, stream: int) -> int:
  """A 32-bit seed for batch stream `stream` of run `seed` (independent orders per stream)."""
  return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1)[0])


def finetune_step(state: steps.TrainState, source: steps.Batch, target: steps.Batch | None,
               rng: jax.Array, *, num_classes: int, alignment: AlignmentLoss | None,
               lambda_: float,
               train_batch_norm: bool,
               learning_rate_fn: optax.Schedule | None = None,
               backend: str | None = None
               ) -> tuple[steps.TrainState, steps.Metrics]:
  """One step on CE(source) + lambda_ * alignment(source features, target features).

  `target` (and `alignment`) are None for cross-entropy-only fine-tuning (no target pass).
  `backend`: the platform the step is built for (see `steps.train_step`).
  """
  source_rng, target_rng = jax.random.split(jax.random.fold_in(rng, state.step))

  def forward(params, images, dropout_rng):
    variables = {"params": params, "batch_stats": state.batch_stats}
    if train_batch_norm:
      (logits, features), updates = state.apply_fn(
          variables, images, train=True, return_features=True, mutable=["batch_stats"],
          rngs={"dropout": dropout_rng})
      return logits, features, updates["batch_stats"]
    logits, features = state.apply_fn(variables, images, train=False, return_features=True)
    return logits, features, state.batch_stats

  def loss_fn(params):
    logits, source_features, batch_stats = forward(params, source["image"], source_rng)
    ce = steps.cross_entropy(logits, source["label"], num_classes).mean()
    if target is None:
      align = jnp.zeros((), jnp.float32)
    else:
      _, target_features, _ = forward(params, target["image"], target_rng)  # Stats discarded.
      align = alignment(source_features, target_features)
    return ce + lambda_ * align, (logits, batch_stats, ce, align)

  with fast_path.fast_convolutions(backend=backend):  # Native convolutions on the CPU.
    (loss, (logits, batch_stats, ce, align)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
  metrics = {"loss": loss, "cross_entropy": ce, "alignment": align,
             "accuracy": jnp.mean(jnp.argmax(logits, -1) == source["label"]),
             "grad_norm": optax.tree.norm(grads)}
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.step)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics["params_finite"] = steps.params_finite(new_state.params)
  return new_state, metrics


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
  """The fine-tuned variables and how the run went."""
  variables: dict[str, Any]
  steps: int
  resumed_from_step: int
  final_metrics: dict[str, float]


class Finetuner:
  """Fine-tuning runs sharing one compiled step: one per (settings, budget, with/without target).

  Build it once and call `run` per seed: the optimizer and step function are the same objects, so
  the step compiles once for all seeds (and for all CE-only variants).
  """

  def __init__(self, model: nn.Module, params: Any, settings: FinetuneSettings, *,
               total_steps: int, steps_per_epoch: int, num_classes: int,
               alignment: AlignmentLoss | None = None, lambda_: float = 0.0,
               apply_fn: Callable[..., Any] | None = None,
               wrap_optimizer: Callable[[optax.GradientTransformation],
                                        optax.GradientTransformation] | None = None,
               input_settings: input_pipeline.InputSettings = input_pipeline.InputSettings()):
    """`alignment` (weighted by `lambda_`) aligns source to target features: runs then take a
    target set. `apply_fn` (default `model.apply`) is what the step differentiates, e.g. a
    fake-quantized apply for quantization-aware fine-tuning; `wrap_optimizer` wraps the
    optimizer, e.g. to keep pruning masks. `input_settings`: where the training splits live
    (`input_pipeline`; the batches are the same either way)."""
    self.model, self.settings, self.input_settings = model, settings, input_settings
    self.apply_fn = apply_fn if apply_fn is not None else model.apply
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self.with_target = alignment is not None
    self.mesh = sharding.make_mesh()
    sharding.check_divisible(settings.batch_size, f"{PREFIX}.batch_size", self.mesh)
    self.schedule = optim.make_schedule(settings.optimizer, total_steps, steps_per_epoch)
    self.tx = trainable.masked_optimizer(optim.make_optimizer(settings.optimizer, self.schedule),
                                         params, settings.trainable)
    if wrap_optimizer is not None:
      self.tx = wrap_optimizer(self.tx)
    self.step_fn = jax.jit(
        functools.partial(finetune_step, num_classes=num_classes, alignment=alignment,
                          lambda_=lambda_ if alignment is not None else 0.0,
                          train_batch_norm=settings.batch_norm == "train",
                          learning_rate_fn=self.schedule),
        donate_argnums=0)

  def run(self, variables: dict[str, Any], source: Arrays, target: Arrays | None, *, seed: int,
          directory: str | Path, meta: dict[str, Any], description: str = "adapt",
          step_callback: resumable.StepCallback | None = None) -> FinetuneResult:
    """Fine-tunes `variables`, checkpointing in `<directory>/checkpoints`; resumes or loads.

    Args:
      variables: the starting {'params', 'batch_stats'}.
      source: labelled (images, labels); batch order from `stream_seed(seed, SOURCE_STREAM)`.
      target: (images, labels) whose labels are never used (with_target), else None.
      seed: batch orders (source and target streams) and dropout.
      directory: this run's folder; a finished run there is loaded, an interrupted one resumed.
      meta: saved with each checkpoint (`trainer.model_meta` plus what identifies the run).
      step_callback: `step_callback(step, state)` after each step (tests).
    """
    if (target is not None) != self.with_target:
      raise ValueError(f"this Finetuner was built {'with' if self.with_target else 'without'} "
                       "an alignment loss: it needs a target set exactly then")
    settings, mesh = self.settings, self.mesh
    variables = jax.device_get(variables)  # Host copies: the step donates (deletes) its input.
    state = sharding.replicate(steps.TrainState.create(
        apply_fn=self.apply_fn, params=variables["params"],
        batch_stats=variables.get("batch_stats", {}), tx=self.tx), mesh)
    rng = sharding.replicate(jax.random.key(seed), mesh)
    source_seed = stream_seed(seed, SOURCE_STREAM)
    target_seed = stream_seed(seed, TARGET_STREAM)

    def stream(arrays: Arrays, stream_seed_: int, name: str) -> input_pipeline.BatchStream:
      return input_pipeline.BatchStream({"image": arrays[0], "label": arrays[1]},
                                        settings.batch_size, stream_seed_, mesh,
                                        self.input_settings, name=name)

    source_stream = stream(source, source_seed, "source")
    target_stream = stream(target, target_seed, "target") if target is not None else None

    def step(state: steps.TrainState, index: int):
      target_batch = target_stream(index) if target_stream is not None else None
      return self.step_fn(state, source_stream(index), target_batch, rng)

    loop = resumable.LoopSettings.of(
        settings, self.total_steps, self.steps_per_epoch,
        divergence_hint=f"{PREFIX}.learning_rate or {PREFIX}.lambda_")
    try:
      result = resumable.run_resumable(
          state, step, loop=loop, directory=Path(directory), meta=meta, description=description,
          what="fine-tuning", step_callback=step_callback,
          start_message=f"on {len(source[1])} source / "
                        f"{len(target[1]) if target is not None else 'no'} target examples")
    finally:
      source_stream.close()
      if target_stream is not None:
        target_stream.close()
    state = result.state
    return FinetuneResult(
        variables=jax.device_get({"params": state.params, "batch_stats": state.batch_stats}),
        steps=self.total_steps, resumed_from_step=result.resumed_from_step,
        final_metrics=result.final_metrics)

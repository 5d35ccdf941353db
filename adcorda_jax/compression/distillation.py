"""Knowledge distillation: train a small student to match a trained teacher.

The loss is Hinton et al. (2015), "Distilling the Knowledge in a Neural Network":

    (1 - alpha) * CE(student, labels)
        + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 factor keeps the soft-target gradients (which shrink as 1/T^2) on the same scale for any
temperature. With `beta > 0` a FitNets-style hint (Romero et al. 2015) adds
`beta * MSE(projection(student features), teacher features)` on the penultimate features; the
linear projection trains with the student and is dropped from the result.

The loop mirrors `training.finetune`: one jitted step (teacher in eval mode, student in train mode),
batch `step` a pure function of (seed, step) (`training.batches`), and restore-or-initialize from
orbax checkpoints, so an interrupted run resumes onto exactly the uninterrupted trajectory. The
checkpointed state's `params` are the student's own, so `checkpointing.load_checkpoint` loads a
distilled student like any trained model.
"""
from __future__ import annotations

import dataclasses
import functools
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
from adcorda_jax.training import input_pipeline, optim, resumable, sharding, steps

PREFIX = "distill"
PROJECTION_STREAM = 1  # fold_in index of the projection's init key (dropout uses the run key).

Arrays = tuple[np.ndarray, np.ndarray]  # (images, labels)


class DistillState(steps.TrainState):
  """The student's train state plus the hint projection, optimized jointly with the student.

  `params` and `batch_stats` are the student's alone; `projection` is {} when `beta == 0`.
  """
  projection: Any = None

  @classmethod
  def create_joint(cls, *, apply_fn: Callable[..., Any], params: Any, batch_stats: Any,
                   projection: Any, tx: optax.GradientTransformation) -> DistillState:
    opt_state = tx.init({"student": params, "projection": projection})
    return cls(step=0, apply_fn=apply_fn, params=params, tx=tx, opt_state=opt_state,
               batch_stats=batch_stats, projection=projection)

  def apply_joint_gradients(self, grads: Any, batch_stats: Any) -> DistillState:
    """One optimizer step on {'student': ..., 'projection': ...} gradients."""
    trainable = {"student": self.params, "projection": self.projection}
    updates, opt_state = self.tx.update(grads, self.opt_state, trainable)
    new = optax.apply_updates(trainable, updates)
    return self.replace(step=self.step + 1, params=new["student"], projection=new["projection"],
                        opt_state=opt_state, batch_stats=batch_stats)


@dataclasses.dataclass(frozen=True)
class DistillSettings:
  """The validated `config.distill` section (the optimizer fields stay in `optimizer`)."""
  epochs: int
  batch_size: int
  alpha: float
  temperature: float
  beta: float
  log_every_steps: int
  checkpoint_every_steps: int
  max_checkpoints: int
  optimizer: ml_collections.ConfigDict


def read_distill_settings(config: ml_collections.ConfigDict) -> DistillSettings:
  """Checks `config.distill`; one-line ConfigErrors name `distill.<key>`."""
  section = config.get(PREFIX)
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError("config has no 'distill' section with the distillation settings")
  # make_optimizer/make_schedule name `train.*` in their errors: check the same fields here first.
  optim.check_optimizer_fields(section, PREFIX)
  return DistillSettings(
      epochs=config_checks.positive_int(section, "epochs", PREFIX),
      batch_size=config_checks.positive_int(section, "batch_size", PREFIX),
      alpha=config_checks.fraction(section, "alpha", PREFIX, default=0.9, allow_one=True),
      temperature=config_checks.positive_float(section, "temperature", PREFIX, default=4.0),
      beta=config_checks.positive_float(section, "beta", PREFIX, default=0.0, allow_zero=True),
      **resumable.read_cadence(section, PREFIX),
      optimizer=section)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                      *, num_classes: int, alpha: float, temperature: float
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Hinton's loss, mean over the batch; metrics hold the plain CE and the KL at temperature T.

  The teacher's logits are constants (`stop_gradient`): only the student learns.
  """
  if student_logits.shape[-1] != num_classes or teacher_logits.shape != student_logits.shape:
    raise ValueError(f"expected student and teacher logits [N, {num_classes}], got "
                     f"{student_logits.shape} and {teacher_logits.shape}")
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, labels).mean()
  # KL(p_teacher || p_student) from log-probabilities on both sides (no log(0) for tiny p).
  kl = optax.losses.kl_divergence_with_log_targets(
      jax.nn.log_softmax(student_logits / temperature),
      jax.nn.log_softmax(teacher_logits / temperature)).mean()
  loss = (1.0 - alpha) * ce + alpha * temperature ** 2 * kl
  return loss, {"cross_entropy": ce, "kl": kl}


def init_projection(rng: jax.Array, student_dim: int, teacher_dim: int) -> dict[str, Any]:
  """Params of the linear hint projection from student to teacher feature space."""
  return nn.Dense(teacher_dim).init(rng, jnp.zeros((1, student_dim), jnp.float32))["params"]


def feature_distillation_loss(student_features: jax.Array, teacher_features: jax.Array,
                              projection_params: Any) -> jax.Array:
  """FitNets hint: MSE between projected student features and (constant) teacher features."""
  teacher_features = jax.lax.stop_gradient(teacher_features)
  projected = nn.Dense(teacher_features.shape[-1]).apply(
      {"params": projection_params}, student_features)
  return jnp.mean(jnp.square(projected - teacher_features))


def distill_step(state: DistillState, batch: steps.Batch, rng: jax.Array, *,
                 teacher_apply: Callable[..., Any], teacher_variables: Any, num_classes: int,
                 alpha: float, temperature: float, beta: float,
                 learning_rate_fn: optax.Schedule | None = None, backend: str | None = None
                 ) -> tuple[DistillState, steps.Metrics]:
  """One step: teacher in eval mode (running BN stats, no dropout), student in train mode.

  `backend`: the platform the step is built for (see `steps.train_step`).
  """
  dropout_rng = jax.random.fold_in(rng, state.step)
  with_features = beta > 0
  with fast_path.fast_convolutions(backend=backend):  # Native convolutions on the CPU.
    teacher_out = teacher_apply(teacher_variables, batch["image"], train=False,
                                return_features=with_features)
  teacher_logits, teacher_features = teacher_out if with_features else (teacher_out, None)

  def loss_fn(trainable):
    (logits, features), updates = state.apply_fn(
        {"params": trainable["student"], "batch_stats": state.batch_stats}, batch["image"],
        train=True, return_features=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    loss, parts = distillation_loss(logits, teacher_logits, batch["label"],
                                    num_classes=num_classes, alpha=alpha, temperature=temperature)
    if with_features:
      parts["feature"] = feature_distillation_loss(features, teacher_features,
                                                   trainable["projection"])
      loss = loss + beta * parts["feature"]
    else:
      parts["feature"] = jnp.zeros((), jnp.float32)
    return loss, (logits, updates["batch_stats"], parts)

  trainable = {"student": state.params, "projection": state.projection}
  with fast_path.fast_convolutions(backend=backend):
    (loss, (logits, batch_stats, parts)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(trainable)
  predictions = jnp.argmax(logits, -1)
  metrics = {"loss": loss, **parts,
             "accuracy": jnp.mean(predictions == batch["label"]),
             "agreement": jnp.mean(predictions == jnp.argmax(teacher_logits, -1)),
             "grad_norm": optax.tree.norm(grads)}
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.step)
  new_state = state.apply_joint_gradients(grads, batch_stats)
  metrics["params_finite"] = steps.params_finite((new_state.params, new_state.projection))
  return new_state, metrics


@dataclasses.dataclass(frozen=True)
class DistillResult:
  """The student's variables (projection dropped) and how the run went."""
  variables: dict[str, Any]
  steps: int
  resumed_from_step: int
  final_metrics: dict[str, float]


def _feature_dim(model: nn.Module, variables: Any, images: np.ndarray) -> int:
  """Width of the model's penultimate features (shape inference only, no compute)."""
  _, features = jax.eval_shape(
      lambda v, x: model.apply(v, x, return_features=True), variables, images[:1])
  return int(features.shape[-1])


class Distiller:
  """Distillation runs from one teacher sharing one compiled step; call `run` per seed."""

  def __init__(self, teacher_model: nn.Module, teacher_variables: dict[str, Any],
               student_model: nn.Module, settings: DistillSettings, *, total_steps: int,
               steps_per_epoch: int, num_classes: int,
               input_settings: input_pipeline.InputSettings = input_pipeline.InputSettings()):
    """`input_settings`: where the training split lives (`input_pipeline`)."""
    self.teacher_model, self.student_model, self.settings = teacher_model, student_model, settings
    self.input_settings = input_settings
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self.mesh = sharding.make_mesh()
    sharding.check_divisible(settings.batch_size, f"{PREFIX}.batch_size", self.mesh)
    self.teacher_variables = sharding.replicate(jax.device_get(teacher_variables), self.mesh)
    self.schedule = optim.make_schedule(settings.optimizer, total_steps, steps_per_epoch)
    self.tx = optim.make_optimizer(settings.optimizer, self.schedule)
    # The teacher's variables are an argument, not a closure: no weights baked into the program.
    self.step_fn = jax.jit(
        functools.partial(distill_step, teacher_apply=teacher_model.apply,
                          num_classes=num_classes, alpha=settings.alpha,
                          temperature=settings.temperature, beta=settings.beta,
                          learning_rate_fn=self.schedule),
        donate_argnums=0)

  def _initial_state(self, variables: dict[str, Any], images: np.ndarray,
                     seed: int) -> DistillState:
    projection: Any = {}
    if self.settings.beta > 0:
      projection = init_projection(
          jax.random.fold_in(jax.random.key(seed), PROJECTION_STREAM),
          _feature_dim(self.student_model, variables, images),
          _feature_dim(self.teacher_model, self.teacher_variables, images))
    return DistillState.create_joint(
        apply_fn=self.student_model.apply, params=variables["params"],
        batch_stats=variables.get("batch_stats", {}), projection=jax.device_get(projection),
        tx=self.tx)

  def run(self, student_variables: dict[str, Any], data: Arrays, *, seed: int,
          directory: str | Path, meta: dict[str, Any], description: str = "distill",
          step_callback: resumable.StepCallback | None = None) -> DistillResult:
    """Distills the teacher into `student_variables`, checkpointing in `<directory>/checkpoints`.

    Args:
      student_variables: the student's starting {'params', 'batch_stats'} (e.g. `model.init`).
      data: labelled (images, labels); batch `step` is `train_batch_indices(..., step, seed)`.
      seed: batch order, student dropout and the hint projection's initialization.
      directory: this run's folder; a finished run there is loaded, an interrupted one resumed.
      meta: saved with each checkpoint (the *student's* model metadata, for `load_checkpoint`).
      step_callback: `step_callback(step, state)` after each step (tests).
    """
    settings, mesh = self.settings, self.mesh
    images, labels = data
    student_variables = jax.device_get(student_variables)  # The step donates its input state.
    state = sharding.replicate(self._initial_state(student_variables, images, seed), mesh)
    rng = sharding.replicate(jax.random.key(seed), mesh)

    stream = input_pipeline.BatchStream({"image": images, "label": labels},
                                        settings.batch_size, seed, mesh, self.input_settings)

    def step(state: DistillState, index: int):
      return self.step_fn(state, stream(index), rng, teacher_variables=self.teacher_variables)

    loop = resumable.LoopSettings.of(
        settings, self.total_steps, self.steps_per_epoch,
        divergence_hint=f"{PREFIX}.learning_rate or {PREFIX}.beta")
    with stream:
      result = resumable.run_resumable(
          state, step, loop=loop, directory=Path(directory), meta=meta, description=description,
          what="distillation", progress_keys=("loss", "agreement"), step_callback=step_callback,
          start_message=f"on {len(labels)} examples, alpha={settings.alpha:g} "
                        f"T={settings.temperature:g} beta={settings.beta:g}")
    state = result.state
    return DistillResult(
        variables=jax.device_get({"params": state.params, "batch_stats": state.batch_stats}),
        steps=self.total_steps, resumed_from_step=result.resumed_from_step,
        final_metrics=result.final_metrics)

"""The train state and pure, jit-able train/eval steps.

`train_step(state, batch, rng)` and `eval_step(variables, batch)` are pure functions; the trainer
jits them with explicit shardings. Per-step randomness is `fold_in(rng, state.step)`, so the same
seed gives the same run and a resumed run the same steps. On the CPU both run the model's plain
convolutions on the native kernels (`models.fast_path`, forward, input and kernel gradients);
`fast_convolutions=False` asks for flax's own convolutions.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from adcorda_jax.data import random_crop_flip
from adcorda_jax.models import fast_path

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  """Optax train state plus BatchNorm running statistics."""
  batch_stats: Any = None


def create_train_state(rng: jax.Array, model: nn.Module, image_shape: tuple[int, ...],
                       tx: optax.GradientTransformation) -> TrainState:
  """Initializes parameters and optimizer state for `model` on images of `image_shape`."""
  variables = model.init({"params": rng}, jnp.zeros((1,) + tuple(image_shape), jnp.float32))
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with optional label smoothing."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, num_classes: int,
               label_smoothing: float = 0.0, augment_padding: int | None = None,
               learning_rate_fn: Callable[[jax.Array], jax.Array] | None = None,
               fast_convolutions: fast_path.FastPath = "auto",
               backend: str | None = None) -> tuple[TrainState, Metrics]:
  """One SGD step on `batch` ({'image', 'label'}); augments when `augment_padding` is not None.

  `fast_convolutions` ('auto': on the CPU) routes plain convolutions through the native kernels.
  `backend` is the platform the step is built for ('auto' resolves against it; default: JAX's
  default backend): e.g. 'cuda' or 'tpu' when lowering for another platform with `jax.export`.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  augment_rng, dropout_rng = jax.random.split(step_rng)
  images = batch["image"]
  if augment_padding is not None:
    images = random_crop_flip(augment_rng, images, augment_padding)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    loss = cross_entropy(logits, batch["label"], num_classes, label_smoothing).mean()
    return loss, (logits, updates)

  with fast_path.fast_convolutions(fast_convolutions, backend=backend):
    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
      "grad_norm": optax.tree.norm(grads),
  }
  if learning_rate_fn is not None:
    metrics["learning_rate"] = learning_rate_fn(state.step)
  new_state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
  # The loss above is computed before the update: only this says the new state is safe to save.
  metrics["params_finite"] = params_finite(new_state.params)
  return new_state, metrics


def params_finite(tree: Any) -> jax.Array:
  """1.0 if every leaf of `tree` is finite, else 0.0: the step metric the loop checks before a
  checkpoint (a loss computed before the update cannot say the new state is safe to save)."""
  return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)])
                 ).astype(jnp.float32)


def eval_step(apply_fn: Callable[..., Any], variables: Any, batch: Batch, *,
              num_classes: int, fast_convolutions: fast_path.FastPath = "auto",
              backend: str | None = None) -> Metrics:
  """Masked sums over a padded batch: correct predictions, loss and example count."""
  with fast_path.fast_convolutions(fast_convolutions, backend=backend):
    logits = apply_fn(variables, batch["image"], train=False)
  mask = batch["mask"]
  loss = cross_entropy(logits, batch["label"], num_classes)
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return {
      "correct": jnp.sum(correct * mask),
      "loss_sum": jnp.sum(loss * mask),
      "count": jnp.sum(mask),
  }


def make_eval_fn(apply_fn: Callable[..., Any], num_classes: int, backend: str | None = None
                 ) -> Callable[[Any, Batch], Metrics]:
  """A jitted eval step closed over the model's `apply_fn` (path chosen for `backend`)."""
  return jax.jit(functools.partial(eval_step, apply_fn, num_classes=num_classes,
                                   backend=backend))

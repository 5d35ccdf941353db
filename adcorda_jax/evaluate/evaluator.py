"""Evaluating refined or compressed models side by side: clean and robust accuracy, resumably.

Shared by `task=adcorda`, `task=quantize` and the compression study: each evaluation is a
`pipeline.Stage` whose fingerprint includes a digest of the evaluated parameters, loaded instead
of recomputed once finished; robust accuracy streams through the resumable attack driver.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adcorda_jax.attacks import flags as flags_lib
from adcorda_jax.attacks.eps import eps_dir_tag, eps_key, eps_label
from adcorda_jax.attacks.driver import attack_split
from adcorda_jax.attacks.model_fn import attack_model
from adcorda_jax.attacks.specs import AttackSpec
from adcorda_jax.data import Dataset
from adcorda_jax.evaluate.settings import EvaluationSettings
from adcorda_jax.models import fast_path
from adcorda_jax.pipeline import Stage, fingerprint as fingerprint_lib
from adcorda_jax.training import batches, evaluation, sharding

Predictor = Callable[[Any, np.ndarray], np.ndarray]
# (variables) -> (logits_fn(params, x), params): the network an attack differentiates.
AttackModelFn = Callable[[Any], tuple[Callable[..., jax.Array], Any]]


@dataclasses.dataclass(frozen=True)
class _ModuleApply:
  """`module.apply`, equal (and hashing equal) for equal modules: one compiled predictor each."""
  module: nn.Module

  def __call__(self, variables: Any, images: jax.Array) -> jax.Array:
    return self.module.apply(variables, images)


def _predicted_labels(apply_fn: Callable[..., jax.Array], backend: str | None, variables: Any,
                      images: jax.Array) -> jax.Array:
  with fast_path.fast_convolutions(backend=backend):  # Forward-only native convs on the CPU.
    return jnp.argmax(apply_fn(variables, images), -1)


# One program per (equal) module and backend, shared by every predictor of it.
_module_labels = jax.jit(_predicted_labels, static_argnums=(0, 1))


def labels_fn(apply_fn: Callable[..., jax.Array], backend: str | None = None
              ) -> Callable[[Any, jax.Array], jax.Array]:
  """The jitted `(variables, images) -> argmax labels` of `apply_fn`, a predictor's program.

  For a bound `module.apply` it is one program shared by all equal modules (a bound method
  compares by its module's identity, so every seed's and cell's new but equal module would
  otherwise compile again); any other function gets its own program. `backend`: the platform
  it is built for (default: JAX's default backend; see `fast_path.fast_convolutions`).
  """
  module = getattr(apply_fn, "__self__", None)
  if (isinstance(module, nn.Module)
      and getattr(apply_fn, "__func__", None) is getattr(type(module), "apply", None)):
    try:
      hash(module)
    except TypeError:  # A field that does not hash (e.g. an array): one program per predictor.
      pass
    else:
      return functools.partial(_module_labels, _ModuleApply(module), backend)
  return jax.jit(functools.partial(_predicted_labels, apply_fn, backend))


def make_predictor(apply_fn: Callable[..., jax.Array], batch_size: int, mesh: jax.sharding.Mesh
                   ) -> Predictor:
  """`predict(variables, images) -> int32 [N]` argmax of `apply_fn` in padded, sharded batches.

  `apply_fn(variables, images)` is `model.apply` or anything with its signature (e.g. a
  quantized apply). Predictors of equal modules' `apply` share one compiled program.
  """
  labels = labels_fn(apply_fn)

  def predict(variables: Any, images: np.ndarray) -> np.ndarray:
    variables = sharding.replicate(variables, mesh)
    dummy = np.zeros(len(images), np.int32)
    chunks = [evaluation.to_host(labels(variables, sharding.put_batch(batch, mesh)["image"]))
              for batch in batches.padded_batches(images, dummy, batch_size)]
    return np.concatenate(chunks)[:len(images)].astype(np.int32) if chunks else dummy

  return predict


def _std(values: list[float]) -> float:
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean and sample std (ddof=1; 0 for one run) over seeds of one variant's evaluations."""
  summary: dict[str, Any] = {"runs": len(runs)}
  for key in ("test_accuracy", "train_accuracy", "val_accuracy", "misclassified_fixed"):
    values = [run[key] for run in runs if run.get(key) is not None]
    summary[key] = float(np.mean(values)) if values else None
    summary[f"{key}_std"] = _std(values) if values else None
  robust, robust_std = {}, {}
  for attack, by_eps in runs[0]["robust_accuracy"].items():
    robust[attack] = {e: float(np.mean([r["robust_accuracy"][attack][e] for r in runs]))
                      for e in by_eps}
    robust_std[attack] = {e: _std([r["robust_accuracy"][attack][e] for r in runs])
                          for e in by_eps}
  summary["robust_accuracy"], summary["robust_accuracy_std"] = robust, robust_std
  summary["per_seed"] = runs
  return summary


@dataclasses.dataclass
class Evaluator:
  """Evaluates one model: clean accuracies and robust test accuracy, resumably per folder.

  `misclassified` are training rows whose later fix rate is reported (`misclassified_fixed`);
  `attack_model_fn` defaults to the library's fastest attack path for `model`.
  """
  dataset: Dataset
  model: Any
  predict: Predictor
  attack_specs: Sequence[AttackSpec]
  eps: Sequence[float]
  batch_size: int
  max_examples: int
  key: jax.Array
  mesh: jax.sharding.Mesh
  misclassified: np.ndarray | None = None
  attack_model_fn: AttackModelFn | None = None
  splits: tuple[str, ...] = ("train", "val", "test")  # Clean accuracy on these.
  retired_keys: frozenset[str] = frozenset()  # See `pipeline.Stage.retired_keys`.

  @classmethod
  def of(cls, settings: EvaluationSettings, dataset: Dataset, model: Any, key: jax.Array,
         mesh: jax.sharding.Mesh, **options: Any) -> "Evaluator":
    """The evaluator of `settings` (config `evaluate`) with `model.apply`'s predictor."""
    predict = options.pop("predict", None) or make_predictor(model.apply, settings.batch_size,
                                                             mesh)
    return cls(dataset=dataset, model=model, predict=predict, attack_specs=settings.specs,
               eps=settings.eps, batch_size=settings.batch_size,
               max_examples=settings.max_examples, key=key, mesh=mesh, **options)

  @property
  def robust_examples(self) -> int:
    count = len(self.dataset.test)
    return count if self.max_examples == 0 else min(self.max_examples, count)

  def __call__(self, variables: Any, directory: Path, fingerprint: dict[str, Any],
               label: str) -> dict[str, Any]:
    stage = Stage(directory, "evaluate", {
        **fingerprint, "evaluate.params_sha1": fingerprint_lib.tree_digest(variables)},
        self.retired_keys).claim()
    done = stage.done()
    if done is not None:
      return done
    data = self.dataset
    outputs: dict[str, Any] = {"label": label}
    train_prediction = None
    for name in self.splits:
      split = getattr(data, name)
      prediction = self.predict(variables, split.images) if len(split) else None
      outputs[f"{name}_accuracy"] = (float(np.mean(prediction == split.labels))
                                     if prediction is not None else None)
      train_prediction = prediction if name == "train" else train_prediction
    rows = self.misclassified
    # The baseline's training errors: how many does this model fix?
    if rows is not None and train_prediction is not None:
      outputs["misclassified_fixed"] = (
          float(np.mean(train_prediction[rows] == data.train.labels[rows])) if len(rows)
          else None)
    count = self.robust_examples
    images, labels = data.test.images[:count], data.test.labels[:count]
    if self.attack_model_fn is not None:
      logits_fn, params = self.attack_model_fn(variables)
    else:
      logits_fn, params = attack_model(self.model, variables)
    robust: dict[str, dict[str, float]] = {}
    outcomes = []
    for spec in self.attack_specs:
      for eps in self.eps:
        result = attack_split(
            spec, logits_fn, params, images, labels, eps=eps, batch_size=self.batch_size,
            key=self.key, mesh=self.mesh,
            out_dir=directory / f"{spec.name}_{spec.norm}_eps{eps_dir_tag(eps)}",
            description=f"{label} {spec.name} eps={eps_label(eps)}",
            batch_size_key="evaluate.batch_size")
        robust.setdefault(spec.name, {})[eps_key(eps)] = result.robust_accuracy
        outcomes.append((spec.name, eps, result))
        if result.details and "cascade" in result.details:
          outputs.setdefault("cascade", {}).setdefault(spec.name, {})[eps_key(eps)] = (
              result.details["cascade"])
    outputs["robust_accuracy"] = robust
    outputs["robust_examples"] = count
    # AutoAttack's sanity checks, on the network as the attacks see it (STE/BPDA if quantized).
    outputs["flags"] = flags_lib.report_flags(
        flags_lib.model_flags(logits_fn, params, images, labels),
        flags_lib.split_square_gains(outcomes), label)
    return stage.finish(outputs)

"""AdCorDA stage 1: the corrected training set, its statistics, and its saved form.

The model's misclassified training inputs are replaced by the outputs of the `correct` attack
(targeted PGD toward the true label within an eps-ball). Two input forms:

* `build_corrected_set(images, labels, result)`: `result` is `attack_split(correct_spec, ...,
  save_adversarial=True)` over the SAME (images, labels), all N rows.
* `build_corrected_set_from_subset(images, labels, clean_prediction, result)`: `result` covers only
  the misclassified rows, `images[misclassified_indices(clean_prediction, labels)]` in that order.
  Cheaper: the attack and its saved inputs cost O(misclassified) instead of O(N).

Failures (still misclassified after the attack) follow `correct.on_failure`: `keep_best` uses the
attack's returned input anyway (its last PGD iterate, moved toward the true label),
`keep_original` (the default) keeps the input unchanged, `drop` removes the row.

On disk a set is `corrected_set.npz` plus a `corrected_set.json` sidecar (provenance + stats),
both written atomically, npz first. The sidecar records a hash of the npz contents, so a run killed
between the two writes is detected instead of pairing new arrays with old provenance.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from adcorda_jax import workdir as workdir_lib
from adcorda_jax.attacks.driver import SplitAttackResult, data_digest, save_npz_atomic
from adcorda_jax.attacks.specs import AttackSpec
from adcorda_jax.pipeline import stage
from adcorda_jax.errors import CheckpointError, ConfigError

FAILURE_POLICIES = ("keep_best", "keep_original", "drop")
ARRAYS_FILE = "corrected_set.npz"
SIDECAR_FILE = "corrected_set.json"
MAX_HISTOGRAM_BINS = 20


@dataclasses.dataclass(frozen=True)
class CorrectedSet:
  """The corrected training set, rows in original order (dropped rows removed).

  `changed`: indices into the ORIGINAL arrays of rows replaced by an attack output.
  `source_index`: for each output row, its index in the original arrays (arange unless `drop`).
  """
  images: np.ndarray
  labels: np.ndarray
  changed: np.ndarray
  source_index: np.ndarray
  stats: dict[str, Any]


def check_failure_policy(value: Any) -> str:
  if value not in FAILURE_POLICIES:
    raise ConfigError(f"correct.on_failure={value!r} is not valid; choose one of: "
                      f"{', '.join(FAILURE_POLICIES)}")
  return value


def misclassified_indices(clean_prediction: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Sorted int64 indices of the rows whose clean prediction is not the label."""
  return np.flatnonzero(np.asarray(clean_prediction) != np.asarray(labels))


def _check_result(result: SplitAttackResult, expected_rows: int, images: np.ndarray) -> None:
  """Programming-error checks: the result must be a `correct` run with saved inputs."""
  if result.spec.name != "correct":
    raise ValueError(f"expected a 'correct' attack result, got {result.spec.name!r}")
  if result.adversarial is None:
    raise ValueError("the attack result has no inputs; run attack_split(save_adversarial=True)")
  if result.num_examples != expected_rows:
    raise ValueError(f"the attack result has {result.num_examples} rows, expected {expected_rows}")
  if result.adversarial.shape[1:] != images.shape[1:]:
    raise ValueError(f"attack inputs of shape {result.adversarial.shape[1:]} do not match "
                     f"images of shape {images.shape[1:]}")


def _steps_histogram(steps: np.ndarray, max_steps: int) -> dict[str, list[int]]:
  """Integer bin edges over [0, max_steps + 1) (one bin per step count up to 20 bins)."""
  top = max(int(max_steps), int(steps.max(initial=0))) + 1
  edges = np.unique(np.round(np.linspace(0, top, min(top, MAX_HISTOGRAM_BINS) + 1)).astype(int))
  counts, _ = np.histogram(steps, bins=edges)
  return {"bin_edges": edges.tolist(), "counts": counts.tolist()}


def _assemble(images: np.ndarray, labels: np.ndarray, rows: np.ndarray,
              result: SplitAttackResult, on_failure: str) -> CorrectedSet:
  """Replaces `images[rows]` by the attack outputs `result.*[k]` for row k of `rows`.

  `rows` are the misclassified indices. A subset row the attack saw as already right (the two
  clean predictions disagreed, e.g. by nondeterministic reductions on an accelerator) counts as
  corrected at norm 0 and keeps its original input (it is not in `changed`).
  """
  success = np.asarray(result.success, bool)
  steps = np.asarray(result.steps_used)
  norms = np.asarray(result.perturbation_norm, np.float32)
  already_right = np.asarray(result.clean_correct, bool)
  corrected = success | already_right
  replace = (corrected & ~already_right) | (~corrected & (on_failure == "keep_best"))
  out_images = np.array(images, copy=True)
  changed = rows[replace]
  out_images[changed] = result.adversarial[replace].astype(images.dtype, copy=False)
  source_index = np.arange(len(labels))
  if on_failure == "drop":
    source_index = np.setdiff1d(source_index, rows[~corrected])
    out_images = out_images[source_index]
  num_mis = int(len(rows))
  num_corrected = int(np.sum(corrected))
  stats = {
      "num_train": int(len(labels)), "num_out": int(len(source_index)),
      "misclassified": num_mis, "corrected": num_corrected, "failed": num_mis - num_corrected,
      "replaced": int(len(changed)), "dropped": int(len(labels) - len(source_index)),
      "success_rate": num_corrected / num_mis if num_mis else 1.0,
      "mean_perturbation_norm": float(np.mean(norms[corrected])) if num_corrected else None,
      "max_perturbation_norm": float(np.max(norms[corrected])) if num_corrected else None,
      "steps_histogram": _steps_histogram(steps, result.spec.steps),
      "on_failure": on_failure, "eps": float(result.eps),
  }
  return CorrectedSet(images=out_images, labels=np.asarray(labels)[source_index],
                      changed=changed.astype(np.int64), source_index=source_index.astype(np.int64),
                      stats=stats)


def _subset(result: SplitAttackResult, rows: np.ndarray) -> SplitAttackResult:
  """The result restricted to `rows` (per-example fields only)."""
  return dataclasses.replace(
      result, clean_prediction=result.clean_prediction[rows],
      clean_correct=result.clean_correct[rows], success=result.success[rows],
      final_correct=result.final_correct[rows], steps_used=result.steps_used[rows],
      perturbation_norm=result.perturbation_norm[rows], adversarial=result.adversarial[rows])


def build_corrected_set(images: np.ndarray, labels: np.ndarray, result: SplitAttackResult,
                        on_failure: str = "keep_original") -> CorrectedSet:
  """The corrected set from a `correct` run over ALL of (images, labels), save_adversarial=True."""
  check_failure_policy(on_failure)
  images, labels = np.asarray(images), np.asarray(labels)
  _check_result(result, len(labels), images)
  rows = np.flatnonzero(~np.asarray(result.clean_correct, bool))
  return _assemble(images, labels, rows, _subset(result, rows), on_failure)


def build_corrected_set_from_subset(images: np.ndarray, labels: np.ndarray,
                                    clean_prediction: np.ndarray, result: SplitAttackResult,
                                    on_failure: str = "keep_original") -> CorrectedSet:
  """The corrected set from a `correct` run over only the misclassified rows.

  `result` must cover `images[misclassified_indices(clean_prediction, labels)]` in that order.
  """
  check_failure_policy(on_failure)
  images, labels = np.asarray(images), np.asarray(labels)
  if np.shape(clean_prediction) != labels.shape:
    raise ValueError(f"clean_prediction has shape {np.shape(clean_prediction)}, "
                     f"labels {labels.shape}")
  rows = misclassified_indices(clean_prediction, labels)
  _check_result(result, len(rows), images)
  return _assemble(images, labels, rows, result, on_failure)


def correction_provenance(*, checkpoint_path: str, checkpoint_step: int, spec: AttackSpec,
                          eps: float, on_failure: str, images: np.ndarray,
                          labels: np.ndarray) -> dict[str, Any]:
  """What a corrected set depends on, JSON-normalized; compared key by key when loading."""
  record = {"checkpoint_path": str(checkpoint_path), "checkpoint_step": int(checkpoint_step),
            "attack": spec.as_dict(), "eps": float(eps),
            "on_failure": check_failure_policy(on_failure),
            "data_sha1": data_digest(np.asarray(images), np.asarray(labels))}
  return json.loads(json.dumps(record))


def _arrays(corrected: CorrectedSet) -> dict[str, np.ndarray]:
  return {"images": corrected.images, "labels": corrected.labels, "changed": corrected.changed,
          "source_index": corrected.source_index}


def save_corrected_set(directory: str | Path, corrected: CorrectedSet,
                       provenance: dict[str, Any]) -> Path:
  """Writes the arrays, then the sidecar {provenance, stats, arrays_sha1}; returns the npz path.

  The stats (counts) are recorded in the sidecar but not compared on load: they are outcomes.
  """
  directory = workdir_lib.makedirs(directory)
  arrays_path = directory / ARRAYS_FILE
  save_npz_atomic(arrays_path, _arrays(corrected))
  workdir_lib.write_json_atomic(directory / SIDECAR_FILE, {
      "provenance": provenance, "stats": corrected.stats,
      "arrays_sha1": data_digest(corrected.images, corrected.labels)})
  return arrays_path


def load_corrected_set(directory: str | Path, expected_provenance: dict[str, Any]) -> CorrectedSet:
  """The set saved in `directory`, if its provenance equals `expected_provenance`.

  Raises a one-line CheckpointError when it is missing, unreadable, or made from different inputs
  (naming the differing provenance keys).
  """
  directory = Path(directory)
  sidecar_path, arrays_path = directory / SIDECAR_FILE, directory / ARRAYS_FILE
  if not sidecar_path.exists() or not arrays_path.exists():
    raise CheckpointError(f"no corrected set in {str(directory)!r} (expected {SIDECAR_FILE} and "
                          f"{ARRAYS_FILE})")
  sidecar = workdir_lib.read_json(sidecar_path)
  if not isinstance(sidecar, dict) or not isinstance(sidecar.get("provenance"), dict):
    raise CheckpointError(f"{str(sidecar_path)!r} has no provenance record; delete the directory")
  stage.check(sidecar["provenance"], expected_provenance,
              f"the corrected set in {str(directory)!r}",
              remedy="delete it or use another directory")
  try:
    with np.load(arrays_path) as data:
      arrays = {name: data[name] for name in ("images", "labels", "changed", "source_index")}
  except (OSError, ValueError, EOFError, KeyError) as e:
    raise CheckpointError(f"cannot read {str(arrays_path)!r}: {e}") from None
  if data_digest(arrays["images"], arrays["labels"]) != sidecar.get("arrays_sha1"):
    raise CheckpointError(f"{str(arrays_path)!r} does not match {SIDECAR_FILE} (interrupted "
                          "save?); delete the directory and rebuild the set")
  return CorrectedSet(stats=sidecar.get("stats", {}), **arrays)

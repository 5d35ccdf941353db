"""Dataset-scale attacks: a whole split through an `AttackSpec`, batch by batch, resumably.

The split is cut into fixed-size batches (the last one padded with copies of real examples and
masked, so everything compiles once), each sharded data-parallel over the mesh with the params
replicated. Batch i uses `fold_in(key, i)`, so a result never depends on where a run was resumed.
Results come back to the host after every batch (device memory stays O(batch)) and, with an
`out_dir`, each finished batch is saved atomically as a small .npz; a restarted run loads those
instead of recomputing them. At the end one merged `arrays.npz` is written and the per-batch files
are removed. `attack.json` fingerprints the run (spec, eps, data, batch size, key), so results of
two different runs never mix in one directory.

Layout of `out_dir`: attack.json, arrays.npz (when finished), batches/batch_000000.npz ...
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh

from adcorda_jax.attacks.compile import attack_jit
from adcorda_jax import distributed, faults, workdir as workdir_lib
from adcorda_jax.attacks import validation
from adcorda_jax.attacks.losses import AttackResult, LogitsFn
from adcorda_jax.attacks.specs import AttackSpec, check_eps
from adcorda_jax.errors import ConfigError
from adcorda_jax.pipeline import fingerprint as fingerprint_lib, stage
from adcorda_jax.progress import Progress
from adcorda_jax.training import sharding

FINGERPRINT_FILE = "attack.json"
ARRAYS_FILE = "arrays.npz"
BATCH_DIR = "batches"
# Per-example arrays saved for every run; `adversarial` is added with save_adversarial.
PER_EXAMPLE = ("clean_prediction", "clean_correct", "success", "final_correct", "steps_used",
               "perturbation_norm")

BatchCallback = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class SplitAttackResult:
  """Per-example outcomes of one attack over a split (real examples only, in split order).

  `final_correct` is whether the model classifies the returned input correctly: ~success for
  untargeted attacks (robust correctness), success for correction (corrected or already right).
  """
  spec: AttackSpec
  eps: float
  clean_prediction: np.ndarray   # [N] int32, argmax on the clean input
  clean_correct: np.ndarray      # [N] bool
  success: np.ndarray            # [N] bool, as AttackResult.success
  final_correct: np.ndarray      # [N] bool
  steps_used: np.ndarray         # [N] int32 (0 for every example at eps = 0)
  perturbation_norm: np.ndarray  # [N] float32, in the spec's norm
  adversarial: np.ndarray | None  # [N, ...] returned inputs, only with save_adversarial
  seconds: float                 # attack time summed over batches (a resumed run included)
  computed_batches: int          # batches run by this call
  loaded_batches: int            # batches found finished on disk
  path: Path | None              # the merged arrays file, when run with an out_dir
  # Attack-specific extras, e.g. autoattack's {"cascade": [...], "broken_by": [N] int16}.
  details: dict[str, Any] | None = None

  @property
  def num_examples(self) -> int:
    return int(self.success.shape[0])

  @property
  def clean_accuracy(self) -> float:
    return float(np.mean(self.clean_correct))

  @property
  def final_accuracy(self) -> float:
    """Accuracy on the returned inputs: robust accuracy for attacks, post-correction accuracy."""
    return float(np.mean(self.final_correct))

  @property
  def robust_accuracy(self) -> float:
    return self.final_accuracy

  @property
  def success_rate(self) -> float:
    return float(np.mean(self.success))

  @property
  def changed(self) -> np.ndarray:
    """[N] bool: examples whose correctness the attack flipped (broken, or corrected)."""
    return self.clean_correct != self.final_correct

  @property
  def mean_perturbation_norm(self) -> float | None:
    """Mean perturbation norm over the flipped examples (None if there are none)."""
    changed = self.changed
    return float(np.mean(self.perturbation_norm[changed])) if changed.any() else None

  @property
  def mean_steps(self) -> float:
    """Mean gradient steps per example over all examples (the attack's cost)."""
    return float(np.mean(self.steps_used))

  def summary(self) -> dict[str, Any]:
    """JSON-ready aggregate numbers."""
    return {"num_examples": self.num_examples, "clean_accuracy": self.clean_accuracy,
            "final_accuracy": self.final_accuracy, "success_rate": self.success_rate,
            "mean_perturbation_norm": self.mean_perturbation_norm,
            "mean_steps": self.mean_steps, "seconds": self.seconds}


@attack_jit(static_argnums=(0, 1, 2, 3))
def _attack_batch(spec, logits_fn, keep_adversarial, eps_is_zero, params, images, labels, key,
                  batch_index, eps):
  """Clean predictions and the attack on one batch with key fold_in(key, batch_index).

  At eps = 0 the ball is the point x, so the attack's answer (adversarial = x, success judged on
  the clean prediction) is given directly instead of running every step in place.
  """
  clean_prediction = jnp.argmax(logits_fn(params, images), axis=-1).astype(jnp.int32)
  if eps_is_zero:
    right = clean_prediction == labels
    result = AttackResult(adversarial=images,
                          success=right if spec.targets_true_label else ~right,
                          steps_used=jnp.zeros(labels.shape, jnp.int32),
                          perturbation_norm=jnp.zeros(labels.shape, jnp.float32))
  else:
    result = spec.run(logits_fn, params, images, labels, jax.random.fold_in(key, batch_index),
                      eps)
  outputs = {"clean_prediction": clean_prediction, "success": result.success,
             "steps_used": result.steps_used.astype(jnp.int32),
             "perturbation_norm": result.perturbation_norm.astype(jnp.float32)}
  if keep_adversarial:
    outputs["adversarial"] = result.adversarial
  return outputs


def _to_host(outputs: dict[str, jax.Array]) -> dict[str, np.ndarray]:
  """Gathers batch-sharded outputs to numpy: every process gets the whole batch (a collective
  across processes in a multi-host run, where each process holds its rows only)."""
  return distributed.gather_to_host(dict(outputs))


def _padded(images: np.ndarray, labels: np.ndarray, start: int,
            batch_size: int) -> tuple[dict[str, np.ndarray], int]:
  """Batch [start, start + batch_size), padded with copies of its own examples: (batch, valid)."""
  valid = min(batch_size, len(labels) - start)
  rows = start + np.arange(batch_size) % valid
  return {"image": images[rows], "label": labels[rows]}, valid


def save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes an .npz through a temporary file in the same folder and an atomic rename."""
  workdir_lib.write_atomic(path, lambda f: np.savez(f, **arrays), mode="wb")


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
  """The arrays of a saved .npz, or None if it is unreadable (then it is recomputed)."""
  try:
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError) as e:
    logging.warning("Ignoring unreadable %s (%s); recomputing it.", path, e)
    return None


def data_digest(images: np.ndarray, labels: np.ndarray) -> str:
  """A content hash of the attacked examples, part of a run's fingerprint."""
  return fingerprint_lib.arrays_digest(images, labels)


def fingerprint(spec: AttackSpec, eps: float, images: np.ndarray, labels: np.ndarray,
                batch_size: int, key: jax.Array, save_adversarial: bool) -> dict[str, Any]:
  """Everything a saved batch depends on, as JSON-normalized data."""
  record = {"spec": spec.as_dict(), "eps": float(eps), "num_examples": len(labels),
            "batch_size": int(batch_size), "save_adversarial": bool(save_adversarial),
            "key": np.asarray(jax.random.key_data(key)).tolist(),
            "data_sha1": data_digest(images, labels)}
  return fingerprint_lib.normalized(record)


def claim(out_dir: Path, expected: dict[str, Any]) -> None:
  """Records the fingerprint in `out_dir`, or checks it matches the one already there."""
  path = out_dir / FINGERPRINT_FILE
  if path.exists():
    stage.check(workdir_lib.read_json(path), expected, f"the attack run in {str(out_dir)!r}",
                remedy="use another directory or delete it")
    return
  workdir_lib.write_json_atomic(path, expected)


def _check_inputs(spec: AttackSpec, logits_fn: LogitsFn, params: Any, images: np.ndarray,
                  labels: np.ndarray, batch_size: int, batch_size_key: str, mesh: Mesh) -> None:
  """Host-side checks of the whole split, once (the per-batch attack call checks nothing)."""
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ConfigError(f"{batch_size_key} must be an integer > 0, got {batch_size!r}")
  sharding.check_divisible(batch_size, batch_size_key, mesh)
  validation.check_images(images)
  classes = validation.num_classes(logits_fn, params, images)
  validation.check_labels(labels, len(images), classes)
  for method in [spec.method] + [component.method for component in spec.components]:
    if classes < method.min_classes:
      raise ConfigError(f"attack {method.name} needs at least {method.min_classes} classes; "
                        f"the model has {classes}")


def _result(spec: AttackSpec, eps: float, arrays: dict[str, np.ndarray], computed: int,
            loaded: int, path: Path | None) -> SplitAttackResult:
  return SplitAttackResult(
      spec=spec, eps=eps, adversarial=arrays.get("adversarial"), seconds=float(arrays["seconds"]),
      computed_batches=computed, loaded_batches=loaded, path=path,
      **{name: arrays[name] for name in PER_EXAMPLE})


def _batch_path(batch_dir: Path, index: int) -> Path:
  return batch_dir / f"batch_{index:06d}.npz"


def _load_finished(batch_dir: Path | None, num_batches: int) -> dict[int, dict[str, np.ndarray]]:
  """The batches a previous, interrupted run finished: {batch index: arrays}."""
  finished = {}
  if batch_dir is not None:
    for index in range(num_batches):
      path = _batch_path(batch_dir, index)
      if path.exists() and (arrays := _load_npz(path)) is not None:
        finished[index] = arrays
  return finished


def _remove_batches(batch_dir: Path) -> None:
  """Deletes the per-batch files once the merged arrays are safely written."""
  if workdir_lib.is_writer():
    shutil.rmtree(batch_dir, ignore_errors=True)


def _merge(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  merged = {name: np.concatenate([b[name] for b in batches]) for name in batches[0]
            if name != "seconds"}
  merged["seconds"] = np.float64(sum(float(b["seconds"]) for b in batches))
  return merged


def attack_split(spec: AttackSpec, logits_fn: LogitsFn, params: Any, images: np.ndarray,
                 labels: np.ndarray, *, eps: float, batch_size: int, key: jax.Array,
                 mesh: Mesh, out_dir: Path | None = None, save_adversarial: bool = False,
                 description: str = "attack", batch_size_key: str = "batch_size",
                 batch_callback: BatchCallback | None = None) -> SplitAttackResult:
  """Runs `spec` at `eps` over every example of (images, labels) in order.

  Args:
    spec: the attack; labels are the true labels (untargeted attacks and correction alike).
    logits_fn, params: from `attack_model(model, variables)`.
    images, labels: the split on the host, float [N, H, W, C] in [0, 1] and int [N].
    eps: the budget in the spec's norm; batch_size: global batch, divisible over the mesh
      (named `batch_size_key` in errors).
    key: base PRNG key; batch i uses fold_in(key, i).
    out_dir: where finished batches and the merged arrays go (None: in memory, no resume).
    save_adversarial: also return/save the returned inputs (N x image size on disk).
    batch_callback: called with the batch index after each computed batch is saved (tests).
  Returns:
    The per-example results; a finished `out_dir` is loaded without recomputing anything.
  """
  eps = check_eps(eps, "eps")
  images, labels = np.asarray(images), np.asarray(labels).astype(np.int32)
  _check_inputs(spec, logits_fn, params, images, labels, batch_size, batch_size_key, mesh)
  if spec.method.run_split is not None:  # e.g. autoattack: a cascade of attack_split runs.
    return spec.method.run_split(
        spec, logits_fn, params, images, labels, eps=eps, batch_size=batch_size, key=key,
        mesh=mesh, out_dir=out_dir, save_adversarial=save_adversarial, description=description,
        batch_size_key=batch_size_key, batch_callback=batch_callback)
  num_batches = -(-len(labels) // batch_size)
  batch_dir = None
  if out_dir is not None:
    out_dir = workdir_lib.makedirs(out_dir)  # The writer's; the other processes only read.
    claim(out_dir, fingerprint(spec, eps, images, labels, batch_size, key, save_adversarial))
    merged_path = out_dir / ARRAYS_FILE
    if merged_path.exists():
      arrays = _load_npz(merged_path)
      if arrays is not None:
        _remove_batches(out_dir / BATCH_DIR)  # Left behind by a kill right after merging.
        return _result(spec, eps, arrays, 0, num_batches, merged_path)
    batch_dir = workdir_lib.makedirs(out_dir / BATCH_DIR)

  finished = _load_finished(batch_dir, num_batches)
  loaded = len(finished)
  if loaded:
    logging.info("%s: resuming with %d of %d batches already done.", description, loaded,
                 num_batches)

  params = sharding.replicate(params, mesh)
  key = sharding.replicate(key, mesh)
  eps_array = np.float32(eps)
  done_examples = sum(len(arrays["success"]) for arrays in finished.values())
  progress = Progress(len(labels), description, unit="img", initial=done_examples)
  untargeted = not spec.targets_true_label

  last_mark = time.perf_counter()
  # For the running accuracy shown in progress: correct after the attack, and examples, so far.
  right_so_far = sum(int(np.sum(arrays["final_correct"])) for arrays in finished.values())
  seen_so_far = done_examples

  def collect(index: int, outputs: dict[str, jax.Array], valid: int) -> None:
    nonlocal last_mark, right_so_far, seen_so_far
    host = {name: value[:valid] for name, value in _to_host(outputs).items()}
    batch_labels = labels[index * batch_size:index * batch_size + valid]
    host["clean_correct"] = host["clean_prediction"] == batch_labels
    host["final_correct"] = ~host["success"] if untargeted else host["success"]
    now = time.perf_counter()
    host["seconds"] = np.float64(now - last_mark)
    last_mark = now
    if batch_dir is not None:
      save_npz_atomic(_batch_path(batch_dir, index), host)
    finished[index] = host
    right_so_far += int(np.sum(host["final_correct"]))
    seen_so_far += valid
    progress.update(valid, accuracy=right_so_far / seen_so_far)
    if batch_callback is not None:
      batch_callback(index)
    faults.point("attack_batch")

  # One batch stays in flight: batch i+1 is dispatched before batch i is fetched and saved.
  pending = None
  try:
    for index in range(num_batches):
      if index in finished:
        continue
      batch, valid = _padded(images, labels, index * batch_size, batch_size)
      placed = sharding.put_batch(batch, mesh)
      outputs = _attack_batch(spec, logits_fn, save_adversarial, eps == 0, params,
                              placed["image"], placed["label"], key, np.int32(index), eps_array)
      if pending is not None:
        collect(*pending)
      pending = (index, outputs, valid)
    if pending is not None:
      collect(*pending)
  finally:
    progress.close()

  arrays = _merge([finished[index] for index in range(num_batches)])
  computed = num_batches - loaded
  if out_dir is None:
    return _result(spec, eps, arrays, computed, loaded, None)
  save_npz_atomic(merged_path, arrays)
  _remove_batches(batch_dir)
  return _result(spec, eps, arrays, computed, loaded, merged_path)

"""AdCorDA building blocks: alignment losses, the corrected training set, trainable masks."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from adcorda_jax.adcorda import alignment, correction_set
from adcorda_jax.attacks import driver
from adcorda_jax.attacks.specs import AttackSpec
from adcorda_jax.errors import CheckpointError, ConfigError
from adcorda_jax.training import optim, sharding, trainable
from tests.helpers import one_line

RNG = np.random.default_rng(0)
EPS = 0.1
SPEC = AttackSpec("correct", steps=8, random_start=False)
NUM_IMAGES, NUM_CLASSES = 40, 5


def features(n: int, d: int = 6, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d))).astype(np.float32)


# --- alignment losses -------------------------------------------------------------------------

def test_coral_matches_numpy_with_different_batch_sizes():
  source, target = features(7, seed=1), features(11, seed=2)
  d = source.shape[1]
  difference = np.cov(source, rowvar=False) - np.cov(target, rowvar=False)
  expected = np.sum(difference ** 2) / (4 * d * d)
  got = alignment.coral_loss(source, target)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_coral_zero_for_identical_and_order_invariant():
  source, target = features(9, seed=3), features(12, seed=4)
  assert float(alignment.coral_loss(source, source)) == pytest.approx(0.0, abs=1e-9)
  base = float(alignment.coral_loss(source, target))
  for perm_s, perm_t in [(RNG.permutation(9), np.arange(12)), (np.arange(9), RNG.permutation(12))]:
    assert float(alignment.coral_loss(source[perm_s], target[perm_t])) == pytest.approx(
        base, rel=1e-5)


def test_coral_scales_as_fourth_power():
  source, target = features(10, seed=5), features(10, seed=6)
  base = float(alignment.coral_loss(source, target))
  for c in (0.5, 3.0):
    assert float(alignment.coral_loss(c * source, c * target)) == pytest.approx(
        c ** 4 * base, rel=1e-4)


@pytest.mark.parametrize("name", ["coral", pytest.param("mmd", marks=pytest.mark.slow)])
def test_mask_ignores_padding_rows(name):
  loss = alignment.alignment_loss(name)
  source, target = features(8, seed=7), features(10, seed=8) + 1.0
  padded = np.concatenate([source, 100.0 * np.ones((3, source.shape[1]), np.float32)])
  mask = np.r_[np.ones(8), np.zeros(3)]
  np.testing.assert_allclose(loss(padded, target, source_mask=mask), loss(source, target),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_mmd_zero_positive_and_symmetric():
  source, target = features(10, seed=9), features(14, seed=10)
  assert abs(float(alignment.mmd_loss(source, source))) < 1e-5
  shifted = float(alignment.mmd_loss(source, source + 3.0))
  assert shifted > 0.1
  assert float(alignment.mmd_loss(source, target)) == pytest.approx(
      float(alignment.mmd_loss(target, source)), rel=1e-5)
  fixed = alignment.mmd_loss(source, source + 3.0, bandwidths=(10.0, 100.0), relative=False)
  assert float(fixed) > 0


def test_losses_jit_and_grad_finite():
  source, target = jnp.asarray(features(8, seed=11)), jnp.asarray(features(8, seed=12))
  for name in ("coral", "mmd"):
    grad = jax.jit(jax.grad(alignment.alignment_loss(name)))(source, target)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0


def test_alignment_registry():
  assert set(alignment.ALIGNMENT_LOSSES) == {"coral", "mmd", "none"}
  assert float(alignment.alignment_loss("none")(features(4), features(5))) == 0.0
  with pytest.raises(ConfigError) as error:
    alignment.alignment_loss("cora")
  message = one_line(error)
  assert "adapt.alignment" in message and "coral, mmd, none" in message


# --- corrected training set -------------------------------------------------------------------

def linear_logits(params, x):
  return x.reshape(len(x), -1) @ params["w"] + params["b"]


@pytest.fixture(scope="module")
def problem():
  """A random linear model on 40 random 4x4 images; the correct attack over all of them."""
  rng = np.random.default_rng(1)
  params = {"w": rng.normal(size=(16, NUM_CLASSES)).astype(np.float32),
            "b": np.zeros(NUM_CLASSES, np.float32)}
  images = rng.uniform(size=(NUM_IMAGES, 4, 4, 1)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, NUM_IMAGES).astype(np.int32)
  result = driver.attack_split(SPEC, linear_logits, params, images, labels, eps=EPS,
                               batch_size=16, key=jax.random.key(0), mesh=sharding.make_mesh(),
                               save_adversarial=True)
  misclassified = ~result.clean_correct
  assert (misclassified & result.success).any() and (misclassified & ~result.success).any()
  return params, images, labels, result


@pytest.mark.parametrize("policy", ["keep_best", "keep_original"])
def test_corrected_set_same_size_changes_only_misclassified(problem, policy):
  params, images, labels, result = problem
  corrected = correction_set.build_corrected_set(images, labels, result, policy)
  assert corrected.images.shape == images.shape and corrected.images.dtype == images.dtype
  np.testing.assert_array_equal(corrected.labels, labels)
  differs = np.flatnonzero(np.any(corrected.images != images, axis=(1, 2, 3)))
  misclassified = np.flatnonzero(~result.clean_correct)
  expected = misclassified if policy == "keep_best" else misclassified[
      result.success[misclassified]]
  np.testing.assert_array_equal(corrected.changed, expected)
  assert set(differs) <= set(expected)
  assert np.max(np.abs(corrected.images - images)) <= EPS + 1e-6
  fixed = corrected.changed[result.success[corrected.changed]]
  predictions = np.argmax(linear_logits(params, corrected.images[fixed]), -1)
  np.testing.assert_array_equal(predictions, labels[fixed])


def test_drop_removes_exactly_the_failed(problem):
  _, images, labels, result = problem
  corrected = correction_set.build_corrected_set(images, labels, result, "drop")
  failed = np.flatnonzero(~result.clean_correct & ~result.success)
  np.testing.assert_array_equal(corrected.source_index, np.setdiff1d(np.arange(NUM_IMAGES), failed))
  np.testing.assert_array_equal(corrected.labels, labels[corrected.source_index])
  assert len(corrected.images) == NUM_IMAGES - len(failed) == corrected.stats["num_out"]
  kept = corrected.images[np.isin(corrected.source_index, corrected.changed, invert=True)]
  np.testing.assert_array_equal(
      kept, images[np.setdiff1d(corrected.source_index, corrected.changed)])


def test_stats_consistent_and_json_ready(problem):
  _, images, labels, result = problem
  stats = correction_set.build_corrected_set(images, labels, result, "keep_best").stats
  misclassified = int(np.sum(~result.clean_correct))
  assert stats["misclassified"] == misclassified
  assert stats["corrected"] + stats["failed"] == misclassified
  assert stats["success_rate"] == pytest.approx(stats["corrected"] / misclassified)
  assert 0 < stats["mean_perturbation_norm"] <= stats["max_perturbation_norm"] <= EPS + 1e-6
  histogram = stats["steps_histogram"]
  assert sum(histogram["counts"]) == misclassified
  assert len(histogram["bin_edges"]) == len(histogram["counts"]) + 1
  json.dumps(stats)


def test_subset_form_matches_full_form(problem):
  params, images, labels, result = problem
  rows = correction_set.misclassified_indices(result.clean_prediction, labels)
  subset = driver.attack_split(SPEC, linear_logits, params, images[rows], labels[rows], eps=EPS,
                               batch_size=16, key=jax.random.key(0),
                               mesh=sharding.make_mesh(), save_adversarial=True)
  full = correction_set.build_corrected_set(images, labels, result, "drop")
  part = correction_set.build_corrected_set_from_subset(images, labels, result.clean_prediction,
                                                        subset, "drop")
  np.testing.assert_array_equal(part.changed, full.changed)
  np.testing.assert_allclose(part.images, full.images, atol=1e-6)
  assert part.stats["corrected"] == full.stats["corrected"]


def test_nothing_misclassified_and_bad_policy(problem):
  _, images, labels, result = problem
  right = np.ones(NUM_IMAGES, bool)
  perfect = driver.SplitAttackResult(
      spec=SPEC, eps=EPS, clean_prediction=labels, clean_correct=right, success=right,
      final_correct=right, steps_used=np.zeros(NUM_IMAGES, np.int32),
      perturbation_norm=np.zeros(NUM_IMAGES, np.float32), adversarial=images, seconds=0.0,
      computed_batches=0, loaded_batches=0, path=None)
  stats = correction_set.build_corrected_set(images, labels, perfect).stats
  assert stats["success_rate"] == 1.0 and stats["misclassified"] == 0
  assert stats["mean_perturbation_norm"] is None
  with pytest.raises(ConfigError) as error:
    correction_set.build_corrected_set(images, labels, result, "discard")
  assert "correct.on_failure" in one_line(error)


def test_save_load_and_provenance_mismatch(problem, tmp_path):
  _, images, labels, result = problem
  corrected = correction_set.build_corrected_set(images, labels, result)
  provenance = correction_set.correction_provenance(
      checkpoint_path="/ckpt/baseline", checkpoint_step=100, spec=SPEC, eps=EPS,
      on_failure="keep_original", images=images, labels=labels)
  correction_set.save_corrected_set(tmp_path, corrected, provenance)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # No temp files left.
  loaded = correction_set.load_corrected_set(tmp_path, provenance)
  np.testing.assert_array_equal(loaded.images, corrected.images)
  np.testing.assert_array_equal(loaded.changed, corrected.changed)
  assert loaded.stats == json.loads(json.dumps(corrected.stats))

  other = dict(provenance, eps=0.2, checkpoint_step=200)
  with pytest.raises(CheckpointError) as error:
    correction_set.load_corrected_set(tmp_path, other)
  message = one_line(error)
  assert "checkpoint_step" in message and "eps" in message and "data_sha1" not in message
  with pytest.raises(CheckpointError) as error:
    correction_set.load_corrected_set(tmp_path / "missing", provenance)
  one_line(error)

  # Arrays replaced without the sidecar (a save killed between its two writes).
  driver.save_npz_atomic(tmp_path / correction_set.ARRAYS_FILE, {
      "images": images, "labels": labels, "changed": corrected.changed,
      "source_index": corrected.source_index})
  with pytest.raises(CheckpointError) as error:
    correction_set.load_corrected_set(tmp_path, provenance)
  assert "does not match" in one_line(error)


# --- trainable parameters ---------------------------------------------------------------------

def toy_params() -> dict:
  rng = np.random.default_rng(2)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  return {"stage3_block2": {"conv2": {"kernel": leaf(3, 3, 2, 2), "bias": leaf(2)},
                            "bn": {"scale": leaf(2)}},
          "stage1_block0": {"conv1": {"kernel": leaf(3, 3, 1, 2)}},
          "classifier": {"kernel": leaf(2, 3), "bias": leaf(3)}}


def test_trainable_mask_selects_matching_paths():
  params = toy_params()
  paths = trainable.param_paths(params)
  assert "stage3_block2/conv2/kernel" in paths and "classifier/bias" in paths
  for pattern in (r"^classifier/", r"stage3_.*kernel", r"bias$", "", ".*"):
    mask = trainable.trainable_mask(params, pattern)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    selected = {p for p, m in zip(paths, jax.tree.leaves(mask), strict=True) if m}
    assert selected == {p for p in paths if re.search(pattern, p)}
  assert all(jax.tree.leaves(trainable.trainable_mask(params, "")))


def test_masked_optimizer_leaves_frozen_params_bitwise_unchanged():
  params = toy_params()
  config = ml_collections.ConfigDict({"optimizer": "adamw", "learning_rate": 0.1,
                                      "weight_decay": 0.5, "schedule": "constant"})
  tx = trainable.masked_optimizer(
      optim.make_optimizer(config, optim.make_schedule(config, 10, 10)), params, "^classifier/")
  state = tx.init(params)
  new_params = params
  for _ in range(2):
    grads = jax.tree.map(jnp.ones_like, new_params)
    updates, state = jax.jit(tx.update)(grads, state, new_params)
    new_params = optax.apply_updates(new_params, updates)
  mask = trainable.trainable_mask(params, "^classifier/")
  for old, new, trains in zip(jax.tree.leaves(params), jax.tree.leaves(new_params),
                              jax.tree.leaves(mask), strict=True):
    if trains:
      assert not np.array_equal(np.asarray(old), np.asarray(new))
    else:
      assert np.asarray(old).tobytes() == np.asarray(new).tobytes()


@pytest.mark.parametrize("pattern, expected", [("conv[", "not a valid regular expression"),
                                               ("^head/", "matches no parameter"),
                                               (3, "regular expression string")])
def test_trainable_errors_are_one_line(pattern, expected):
  with pytest.raises(ConfigError) as error:
    trainable.masked_optimizer(optax.sgd(0.1), toy_params(), pattern)
  message = one_line(error)
  assert "adapt.trainable" in message and expected in message
  if expected == "matches no parameter":
    assert "classifier/bias" in message and "stage3_block2/" in message

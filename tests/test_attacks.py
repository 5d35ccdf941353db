"""Adversarial attacks: geometry, exact FGSM, early stopping, per-example eps, APGD vs PGD,
correction and argument errors, on a linear model and a small CNN trained on digits."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from sklearn.datasets import load_digits

from adcorda_jax import attacks
from adcorda_jax.attacks import apgd, norms
from adcorda_jax.errors import ConfigError
from adcorda_jax.models import create_model
from tests.helpers import one_line

TOLERANCE = 1e-6  # x +- eps is rounded to float32, so the ball holds up to about one ulp.
KEY = jax.random.key(0)


def linear_logits(weights, x):
  """A linear 4-class model on flattened 4x4 images: exact gradients, compiles in a blink."""
  return x.reshape(len(x), -1) @ weights


LINEAR_WEIGHTS = jax.random.normal(jax.random.key(1), (16, 4))


class TrainedCNN:
  """A width-0.25 small_cnn trained for 100 Adam steps on digits, plus 128 held-out digits."""

  def __init__(self):
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    self.model = create_model(ml_collections.ConfigDict({"name": "small_cnn", "width": 0.25}),
                              10, (0.5,), (0.25,))
    self.variables = self._train(images[:1500], labels[:1500])
    self.x, self.labels = jnp.asarray(images[1500:1628]), jnp.asarray(labels[1500:1628])
    self.logits_fn = lambda variables, x: self.model.apply(variables, x, train=False)

  def _train(self, images, labels):
    variables = self.model.init(jax.random.key(0), images[:1])
    tx = optax.adam(1e-2)

    @jax.jit
    def step(variables, opt_state, x, y):
      def loss_fn(params):
        logits, updates = self.model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
            mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

      grads, updates = jax.grad(loss_fn, has_aux=True)(variables["params"])
      deltas, opt_state = tx.update(grads, opt_state)
      params = optax.apply_updates(variables["params"], deltas)
      return {"params": params, "batch_stats": updates["batch_stats"]}, opt_state

    opt_state = tx.init(variables["params"])
    rng = np.random.default_rng(0)
    for _ in range(100):
      batch = rng.choice(len(images), 64, replace=False)
      variables, opt_state = step(variables, opt_state, images[batch], labels[batch])
    return variables

  def predictions(self, x):
    return np.asarray(jnp.argmax(self.logits_fn(self.variables, x), -1))

  def cross_entropy(self, x, labels):
    logits = self.logits_fn(self.variables, x)
    return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@pytest.fixture(scope="module")
def cnn():
  trained = TrainedCNN()
  assert np.mean(trained.predictions(trained.x) == np.asarray(trained.labels)) > 0.85
  return trained


def _run(attack, logits_fn, params, x, labels, *, eps, norm, targeted=False, key=KEY,
         steps=10, **kwargs):
  """Calls any attack with a step size suited to its budget."""
  if attack == "fgsm":
    return attacks.fgsm(logits_fn, params, x, labels, eps=eps, norm=norm, targeted=targeted)
  if attack == "apgd":
    return attacks.apgd_ce(logits_fn, params, x, labels, key=key, eps=eps, steps=steps,
                           norm=norm, **kwargs)
  if attack in ("apgd_dlr", "apgd_t"):
    return apgd.apgd(logits_fn, params, x, labels, key=key, eps=eps, steps=steps, norm=norm,
                     loss="dlr" if attack == "apgd_dlr" else "dlr_targeted", **kwargs)
  step_size = 2.5 * np.maximum(eps, 1e-3) / steps
  if attack == "correct":
    return attacks.correct(logits_fn, params, x, labels, eps=eps, step_size=step_size,
                           steps=steps, norm=norm, **kwargs)
  return attacks.pgd(logits_fn, params, x, labels, key=key, eps=eps, step_size=step_size,
                     steps=steps, norm=norm, targeted=targeted, **kwargs)


def _check_ball_and_image_range(attack, norm, batch, eps, per_example, targeted, seed):
  """Each adversarial is within eps of its input in `norm`, inside [0, 1], in the step budget."""
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.uniform(keys[0], (batch, 4, 4, 1))
  x = jnp.where(x < 0.2, 0.0, jnp.where(x > 0.8, 1.0, x))  # Pixels at both range limits.
  labels = jax.random.randint(keys[1], (batch,), 0, 4)
  eps = np.linspace(0.0, eps, batch).astype(np.float32) if per_example else eps
  result = _run(attack, linear_logits, LINEAR_WEIGHTS, x, labels, eps=eps, norm=norm,
                targeted=targeted, key=keys[2])
  chex.assert_shape(result.adversarial, x.shape)
  assert result.adversarial.dtype == x.dtype
  assert float(result.adversarial.min()) >= 0.0 and float(result.adversarial.max()) <= 1.0
  norms_ = np.asarray(norms.perturbation_norm(result.adversarial - x, norm))
  np.testing.assert_allclose(result.perturbation_norm, norms_, atol=1e-6)
  assert np.all(norms_ <= np.broadcast_to(eps, (batch,)) + TOLERANCE)
  # APGD-T runs once per target class: 3 on this 4-class model.
  steps = {"fgsm": 1, "apgd_t": 30}.get(attack, 10)
  assert np.all((0 <= np.asarray(result.steps_used)) & (result.steps_used <= steps))


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(attack=st.sampled_from(["fgsm", "pgd", "apgd", "apgd_dlr", "apgd_t", "correct"]),
       norm=st.sampled_from(norms.NORMS), batch=st.sampled_from([3, 5]),
       eps=st.floats(0.0, 1.5), per_example=st.booleans(), targeted=st.booleans(),
       seed=st.integers(0, 2**16))
def test_adversarials_stay_in_the_ball_and_image_range(attack, norm, batch, eps, per_example,
                                                        targeted, seed):
  _check_ball_and_image_range(attack, norm, batch, eps, per_example, targeted, seed)


@pytest.mark.parametrize("attack, norm, eps, per_example, targeted", [
    ("fgsm", "linf", 0.5, False, False),
    ("pgd", "l2", 1.0, True, False),
    ("apgd", "linf", 0.5, True, True),
    ("apgd_dlr", "l2", 1.0, True, False),
    ("apgd_t", "linf", 0.5, False, False),
    ("correct", "l2", 1.0, False, False),
])
def test_each_attack_stays_in_the_ball_and_image_range(attack, norm, eps, per_example, targeted):
  """One fixed case per attack, for the fast tier; the property test above explores the rest."""
  _check_ball_and_image_range(attack, norm, 5, eps, per_example, targeted, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("norm", norms.NORMS)
def test_fgsm_is_one_steepest_ascent_step_from_x(cnn, norm):
  eps = 0.1
  loss = lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      cnn.logits_fn(cnn.variables, x), cnn.labels))
  grad = jax.grad(loss)(cnn.x)
  if norm == "linf":
    expected = jnp.clip(cnn.x + eps * jnp.sign(grad), 0.0, 1.0)
  else:
    unit = grad / jnp.linalg.norm(grad.reshape(len(grad), -1), axis=1)[:, None, None, None]
    expected = jnp.clip(cnn.x + eps * unit, 0.0, 1.0)
  result = attacks.fgsm(cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, eps=eps, norm=norm)
  # Compiled and eager gradients may differ in the last bits, so a sign may flip only where the
  # gradient is ~0; everywhere else the linf step is bit-exact.
  decisive = np.abs(np.asarray(grad)) > 1e-6
  if norm == "linf":
    np.testing.assert_array_equal(result.adversarial[decisive], expected[decisive])
  np.testing.assert_allclose(result.adversarial, expected, atol=1e-5)
  np.testing.assert_array_equal(result.success, cnn.predictions(expected) != cnn.labels)


@pytest.mark.slow
def test_targeted_attacks_and_correction_lower_the_target_loss(cnn):
  targets = (cnn.labels + 1) % 10
  clean = cnn.cross_entropy(cnn.x, targets)
  for attack in ("fgsm", "pgd"):
    result = _run(attack, cnn.logits_fn, cnn.variables, cnn.x, targets, eps=0.1, norm="linf",
                  targeted=True)
    attacked = cnn.cross_entropy(result.adversarial, targets)
    assert np.mean(attacked) < 0.5 * np.mean(clean), attack
    assert np.mean(attacked < clean) > 0.95, attack
    np.testing.assert_array_equal(result.success, cnn.predictions(result.adversarial) == targets)
  wrong = cnn.predictions(cnn.x) != cnn.labels
  corrected = _run("correct", cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, eps=0.3,
                   norm="linf", steps=20)
  before = cnn.cross_entropy(cnn.x, cnn.labels)[wrong]
  after = cnn.cross_entropy(corrected.adversarial, cnn.labels)[wrong]
  assert np.all(after < before)


def _check_steps_and_success(cnn, result, steps):
  np.testing.assert_array_equal(result.success, cnn.predictions(result.adversarial) != cnn.labels)
  assert np.all(result.steps_used <= steps)
  assert np.all(result.steps_used[~np.asarray(result.success)] == steps)


@pytest.mark.slow
def test_pgd_early_stopping_freezes_successes_and_never_undoes_them(cnn):
  def run(steps, early_stop):
    return attacks.pgd(cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, key=KEY, eps=0.1,
                       step_size=0.025, steps=steps, early_stop=early_stop)

  short, long, plain = run(10, True), run(20, True), run(20, False)
  won = np.asarray(short.success)
  assert 0 < won.sum() < len(won)
  # Same key, same trajectory: an example broken within 10 steps stays frozen where it broke.
  np.testing.assert_array_equal(long.adversarial[won], short.adversarial[won])
  np.testing.assert_array_equal(long.steps_used[won], short.steps_used[won])
  assert np.all(long.success[won])
  for result, steps in ((short, 10), (long, 20), (plain, 20)):
    _check_steps_and_success(cnn, result, steps)
  # Plain PGD returns its last iterate, which can drift back; stopping early never loses one.
  assert np.all(long.success[np.asarray(plain.success)])


@pytest.mark.slow
def test_apgd_early_stopping_only_saves_work(cnn):
  stopped, plain = (attacks.apgd_ce(cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, key=KEY,
                                    eps=0.1, steps=20, early_stop=early_stop)
                    for early_stop in (True, False))
  # APGD returns the first misclassified point either way, and examples never interact, so
  # freezing successful examples must not change any result.
  chex.assert_trees_all_equal(stopped, plain)
  assert 0 < np.sum(stopped.success) < len(cnn.x)
  _check_steps_and_success(cnn, stopped, 20)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_restarts_keep_the_first_success_and_only_add_more(cnn, attack):
  once, thrice = (_run(attack, cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, eps=0.08,
                       norm="linf", steps=10, restarts=restarts) for restarts in (1, 3))
  won = np.asarray(once.success)
  assert np.all(thrice.success[won])  # The first restart is the single run; later ones add.
  np.testing.assert_array_equal(thrice.adversarial[won], once.adversarial[won])
  np.testing.assert_array_equal(thrice.steps_used[won], once.steps_used[won])
  late = np.asarray(thrice.success) & ~won
  assert np.all((thrice.steps_used[late] > 10) & (thrice.steps_used[late] <= 30))
  assert np.all(thrice.steps_used[~np.asarray(thrice.success)] == 30)
  # Unbroken examples keep the restart with the highest loss, never worse than the first.
  lost = ~np.asarray(thrice.success)
  assert np.all(cnn.cross_entropy(thrice.adversarial, cnn.labels)[lost]
                >= cnn.cross_entropy(once.adversarial, cnn.labels)[lost] - 1e-5)


@pytest.mark.slow
def test_per_example_eps_equals_separate_runs(cnn):
  eps = np.where(np.arange(len(cnn.x)) % 2 == 0, 0.05, 0.15).astype(np.float32)
  for attack in ("pgd", "apgd"):  # Per-example step sizes too: _run scales them with eps.
    mixed = _run(attack, cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, eps=eps, norm="linf")
    for value in (0.05, 0.15):
      alone = _run(attack, cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, eps=value,
                   norm="linf")
      chex.assert_trees_all_equal(jax.tree.map(lambda a: a[eps == value], mixed),
                                  jax.tree.map(lambda a: a[eps == value], alone))


@pytest.mark.slow
def test_robust_accuracy_curve_matches_separate_runs_and_falls_with_eps(cnn):
  grid = [0.0, 0.03, 0.06, 0.1, 0.2]
  kwargs = dict(key=KEY, step_size=0.01, steps=30)
  curve = np.asarray(attacks.robust_accuracy_curve(
      attacks.pgd, cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, grid, **kwargs))
  separate = [1 - np.mean(attacks.pgd(cnn.logits_fn, cnn.variables, cnn.x, cnn.labels,
                                      eps=eps, **kwargs).success) for eps in grid]
  np.testing.assert_allclose(curve, separate, atol=1.5 / len(cnn.x))  # At most one flip.
  assert curve[0] == np.mean(cnn.predictions(cnn.x) == cnn.labels)
  assert np.all(np.diff(curve) <= 0) and curve[-1] < 0.5 * curve[0]


@pytest.mark.slow
def test_same_key_repeats_and_different_keys_differ(cnn):
  first, again, other = (attacks.pgd(cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, key=key,
                                     eps=0.1, step_size=0.02, steps=5)
                         for key in (KEY, KEY, jax.random.key(7)))
  chex.assert_trees_all_equal(first, again)
  moved = ~np.asarray(first.success)
  assert not np.array_equal(first.adversarial[moved], other.adversarial[moved])


@pytest.mark.slow
def test_apgd_is_at_least_as_strong_as_pgd(cnn):
  eps, steps = 0.1, 20
  pgd_result = attacks.pgd(cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, key=KEY, eps=eps,
                           step_size=2.5 * eps / steps, steps=steps)
  apgd_result = attacks.apgd_ce(cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, key=KEY,
                                eps=eps, steps=steps)
  pgd_accuracy = 1 - float(np.mean(pgd_result.success))
  apgd_accuracy = 1 - float(np.mean(apgd_result.success))
  print(f"robust accuracy at linf eps={eps}, {steps} steps: PGD {pgd_accuracy:.4f}, "
        f"APGD-CE {apgd_accuracy:.4f}")
  assert 0.05 < pgd_accuracy < 0.95  # An eps where the comparison means something.
  assert apgd_accuracy <= pgd_accuracy


def test_apgd_checkpoints_follow_the_paper():
  is_checkpoint, interval = apgd.checkpoint_schedule(100)
  ends = np.flatnonzero(is_checkpoint) + 1  # Updates completed at each checkpoint.
  np.testing.assert_array_equal(ends, [22, 41, 57, 70, 80, 87, 93, 99])
  np.testing.assert_array_equal(interval[is_checkpoint], np.diff([0, *ends]))


@pytest.mark.slow
def test_correction_fixes_mistakes_and_leaves_correct_inputs_bit_identical(cnn):
  right = cnn.predictions(cnn.x) == np.asarray(cnn.labels)
  assert 0 < (~right).sum()
  for norm, eps in (("linf", 0.3), ("l2", 3.0)):
    result = _run("correct", cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, eps=eps,
                  norm=norm, steps=20)
    np.testing.assert_array_equal(result.adversarial[right], cnn.x[right])
    assert np.all(result.success[right]) and np.all(result.steps_used[right] == 0)
    assert np.all(result.perturbation_norm[right] == 0)
    np.testing.assert_array_equal(result.success,
                                  cnn.predictions(result.adversarial) == cnn.labels)
    assert np.mean(result.success[~right]) >= 0.8, norm
    assert np.all(result.steps_used[~right] > 0)


@pytest.mark.parametrize("change, message", [
    (dict(eps=-0.1), "eps must be >= 0, got -0.1"),
    (dict(eps=float("nan")), "eps must be finite, got nan"),
    (dict(eps=np.array([0.1, -0.2, 0.1])), "eps must be >= 0, got -0.2"),
    (dict(norm="l3"), "norm='l3' is not valid; choose one of: linf, l2"),
    (dict(steps=0), "steps must be an integer > 0, got 0"),
    (dict(restarts=0), "restarts must be an integer > 0, got 0"),
    (dict(step_size=0.0), "step_size must be > 0, got 0.0"),
    (dict(labels=np.array([0, 1, 4])), "labels must be in [0, 4), got 4"),
    (dict(labels=np.array([0, 1])), "labels must have shape (3,) to match x, got shape (2,)"),
    (dict(x=np.full((3, 4, 4, 1), 1.5, np.float32)), "x must lie in [0, 1]"),
    (dict(key=None), "key must be a PRNG key"),
])
def test_bad_arguments_give_one_line_config_errors(change, message):
  kwargs = dict(x=np.full((3, 4, 4, 1), 0.5, np.float32), labels=np.array([0, 1, 2]), key=KEY,
                eps=0.1, step_size=0.01, steps=5, norm="linf", restarts=1)
  kwargs.update(change)
  with pytest.raises(ConfigError) as error:
    attacks.pgd(linear_logits, LINEAR_WEIGHTS, kwargs.pop("x"), kwargs.pop("labels"), **kwargs)
  assert message in one_line(error)


def test_apgd_and_curve_reject_bad_arguments():
  x, labels = np.full((3, 4, 4, 1), 0.5, np.float32), np.array([0, 1, 2])
  with pytest.raises(ConfigError) as error:
    attacks.apgd_ce(linear_logits, LINEAR_WEIGHTS, x, labels, key=KEY, eps=0.1, steps=5,
                    rho=1.5)
  assert "rho must be a number in (0, 1], got 1.5" in one_line(error)
  with pytest.raises(ConfigError) as error:
    attacks.robust_accuracy_curve(attacks.pgd, linear_logits, LINEAR_WEIGHTS, x, labels,
                                  [0.1, -0.5], key=KEY, step_size=0.1, steps=5)
  assert "eps_grid must be >= 0, got -0.5" in one_line(error)

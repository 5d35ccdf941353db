"""Square attack: the reference's schedule and pattern, ball and box, query counting, restarts,
determinism, models without gradients, the registry entry and argument errors."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from adcorda_jax import attacks
from adcorda_jax.attacks import norms, specs
from adcorda_jax.attacks.square_attack import eta, p_schedule, square, window_size
from adcorda_jax.errors import ConfigError
from tests.helpers import one_line
from tests.test_attacks import LINEAR_WEIGHTS, TOLERANCE, TrainedCNN, linear_logits

KEY = jax.random.key(0)
# The fast tests share one batch size and budget, so they share compiled programs.
BATCH, QUERIES = 8, 100


@pytest.fixture(scope="module")
def cnn():
  trained = TrainedCNN()
  assert np.mean(trained.predictions(trained.x) == np.asarray(trained.labels)) > 0.85
  return trained


def quantized_logits(weights, x):
  """The linear model on inputs rounded to 1/4: a step function, its gradient is zero."""
  return linear_logits(weights, jnp.round(x * 4.0) / 4.0)


def _batch(seed, batch=BATCH, shape=(4, 4, 1)):
  """Images with pixels at both range limits, and labels; numpy, so no eager compiles."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(batch, *shape)).astype(np.float32)
  x = np.where(x < 0.2, 0.0, np.where(x > 0.8, 1.0, x)).astype(np.float32)
  return x, rng.integers(0, 4, batch).astype(np.int32)


def _distance(delta, norm):
  flat = np.abs(np.asarray(delta, np.float32).reshape(len(delta), -1))
  return flat.max(axis=1) if norm == "linf" else np.sqrt(np.sum(flat * flat, axis=1))


def _check_result(result, logits_fn, params, x, labels, eps, norm, queries):
  """In the ball and box, success = misclassified, steps_used = queries until success."""
  adversarial, x = np.asarray(result.adversarial), np.asarray(x)
  assert adversarial.shape == x.shape and adversarial.dtype == x.dtype
  assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
  distance = _distance(adversarial - x, norm)
  np.testing.assert_allclose(result.perturbation_norm, distance, atol=1e-6)
  assert np.all(distance <= np.broadcast_to(eps, (len(x),)) * (1 + 1e-6) + TOLERANCE)
  predictions = np.argmax(np.asarray(logits_fn(params, result.adversarial)), -1)
  np.testing.assert_array_equal(result.success, predictions != np.asarray(labels))
  won, steps_used = np.asarray(result.success), np.asarray(result.steps_used)
  assert np.all((steps_used[won] >= 1) & (steps_used[won] <= queries))
  assert np.all(steps_used[~won] == queries)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(norm=st.sampled_from(norms.NORMS), batch=st.sampled_from([3, 5]),
       eps=st.floats(0.0, 1.5), per_example=st.booleans(), seed=st.integers(0, 2**16))
def test_adversarials_stay_in_the_ball_and_image_range(norm, batch, eps, per_example, seed):
  x, labels = _batch(seed, batch)
  eps = np.linspace(0.0, eps, batch).astype(np.float32) if per_example else eps
  result = square(linear_logits, LINEAR_WEIGHTS, x, labels, key=jax.random.key(seed), eps=eps,
                  queries=QUERIES, norm=norm)
  _check_result(result, linear_logits, LINEAR_WEIGHTS, x, labels, eps, norm, QUERIES)


@pytest.mark.parametrize("norm, eps", [("linf", 0.3), ("l2", 1.0)])
def test_each_norm_stays_in_the_ball_and_image_range(norm, eps):
  """One fixed case per norm for the fast tier, per-example eps; the property test explores."""
  x, labels = _batch(0)
  eps = np.linspace(0.0, eps, BATCH).astype(np.float32)
  result = square(linear_logits, LINEAR_WEIGHTS, x, labels, key=KEY, eps=eps, queries=QUERIES,
                  norm=norm)
  _check_result(result, linear_logits, LINEAR_WEIGHTS, x, labels, eps, norm, QUERIES)
  assert np.any(result.success)


@pytest.mark.parametrize("shape, norm, eps", [
    ((5, 9, 3), "l2", 1.0), pytest.param((5, 9, 3), "linf", 0.2, marks=pytest.mark.slow),
    pytest.param((2, 3, 1), "l2", 1.0, marks=pytest.mark.slow)])
def test_non_square_colour_and_tiny_images_and_eps_zero(shape, norm, eps):
  weights = np.random.default_rng(2).normal(size=(int(np.prod(shape)), 4)).astype(np.float32)
  x, labels = _batch(1, 4, shape)
  result = square(linear_logits, weights, x, labels, key=KEY, eps=eps, queries=20, norm=norm)
  _check_result(result, linear_logits, weights, x, labels, eps, norm, 20)
  assert np.all(result.perturbation_norm > 0)
  still = square(linear_logits, weights, x, labels, key=KEY, eps=0.0, queries=20, norm=norm)
  np.testing.assert_array_equal(still.adversarial, x)  # The ball is the point x.
  np.testing.assert_array_equal(still.success,
                                np.argmax(x.reshape(len(x), -1) @ weights, -1) != labels)


def test_the_schedule_halves_p_at_the_reference_iterations():
  halvings = [10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000]  # Out of 10000 queries.
  for k, last in enumerate(halvings):
    assert p_schedule(last, 10000, 0.8) == 0.8 / 2 ** k
    assert p_schedule(last + 1, 10000, 0.8) == 0.8 / 2 ** (k + 1)
  assert p_schedule(0, 10000, 0.8) == 0.8 and p_schedule(9999, 10000, 0.8) == 0.8 / 512
  # Rescaled to the budget: with 5000 queries iteration i acts as 2i, with 1000 as 10i.
  assert p_schedule(5, 5000, 0.8) == 0.8 and p_schedule(6, 5000, 0.8) == 0.4
  assert p_schedule(100, 1000, 0.8) == 0.05 and p_schedule(101, 1000, 0.8) == 0.025


def test_window_sides_match_the_reference_formula():
  # CIFAR-10 with p_init 0.8: one side per phase of the schedule.
  p = 0.8 / 2.0 ** np.arange(10)
  np.testing.assert_array_equal(window_size(p, 32, 32, "linf"), [29, 20, 14, 10, 7, 5, 4, 3, 2, 1])
  np.testing.assert_array_equal(window_size(p, 32, 32, "l2"), [29, 21, 15, 11, 7, 5, 5, 3, 3, 3])
  for height, width, p_init in ((8, 8, 0.8), (28, 28, 0.05), (5, 9, 0.3), (4, 4, 1.0)):
    p = p_init / 2.0 ** np.arange(10)
    expected = np.minimum(np.maximum(np.round(np.sqrt(p * height * width)), 1), min(height, width))
    np.testing.assert_array_equal(window_size(p, height, width, "linf"), expected)


def test_eta_is_the_reference_l2_pattern():
  # s = 3: the top row is a 1x3 rectangle stack [.25, 1.25, .25], the bottom two rows the 2x3
  # one [[.25, .25, .25], [.25, 1.25, .25]], negated; each half of unit norm, then normalized.
  top = np.array([[0.25, 1.25, 0.25]])
  bottom = np.array([[0.25, 0.25, 0.25], [0.25, 1.25, 0.25]])
  expected = np.concatenate([top / np.linalg.norm(top), -bottom / np.linalg.norm(bottom)])
  expected /= np.sqrt(2.0)
  padded = np.asarray(eta(3, 5))
  np.testing.assert_allclose(padded[:3, :3], expected, rtol=1e-6)
  assert np.all(padded[3:] == 0) and np.all(padded[:, 3:] == 0)
  np.testing.assert_array_equal(eta(1, 1), [[-1.0]])
  for size in (4, 7, 12):
    pattern = np.asarray(eta(jnp.int32(size), 12))[:size, :size]
    np.testing.assert_allclose(np.linalg.norm(pattern), 1.0, rtol=1e-6)
    assert np.all(pattern[:size // 2] > 0) and np.all(pattern[size // 2:] < 0)
    if size % 2:  # Odd windows (the l2 attack's) are centred, so symmetric left to right.
      np.testing.assert_allclose(pattern, pattern[:, ::-1], rtol=1e-6)


def test_same_key_repeats_and_other_keys_differ():
  x, labels = _batch(2)
  for norm, eps in (("linf", 0.05), ("l2", 0.2)):
    first, again, other = (square(linear_logits, LINEAR_WEIGHTS, x, labels, key=key, eps=eps,
                                  queries=QUERIES, norm=norm)
                           for key in (KEY, KEY, jax.random.key(7)))
    chex.assert_trees_all_equal(first, again)
    assert not np.array_equal(first.adversarial, other.adversarial)


def _mixed_eps():
  return np.where(np.arange(BATCH) % 2 == 0, 0.05, 0.1).astype(np.float32)


def test_per_example_eps_equals_separate_runs():
  """Draws are per example and a finished example no longer changes, so examples never
  interact: a mixed-eps batch gives each example what a run at its eps gives."""
  x, labels = _batch(3)
  eps = _mixed_eps()
  mixed = square(linear_logits, LINEAR_WEIGHTS, x, labels, key=KEY, eps=eps, queries=QUERIES)
  for value in (0.05, 0.1):
    alone = square(linear_logits, LINEAR_WEIGHTS, x, labels, key=KEY, eps=value,
                   queries=QUERIES)
    chosen = eps == np.float32(value)
    chex.assert_trees_all_equal(jax.tree.map(lambda a: np.asarray(a)[chosen], mixed),
                                jax.tree.map(lambda a: np.asarray(a)[chosen], alone))


@pytest.mark.slow
@pytest.mark.skipif(not jax.config.jax_threefry_partitionable,
                    reason="prefix-stable random draws need jax_threefry_partitionable")
def test_the_first_examples_of_a_batch_get_the_same_result_alone():
  x, labels = _batch(3)
  eps = _mixed_eps()
  whole = square(linear_logits, LINEAR_WEIGHTS, x, labels, key=KEY, eps=eps, queries=QUERIES)
  prefix = square(linear_logits, LINEAR_WEIGHTS, x[:5], labels[:5], key=KEY, eps=eps[:5],
                  queries=QUERIES)
  chex.assert_trees_all_equal(jax.tree.map(lambda a: np.asarray(a)[:5], whole),
                              jax.tree.map(np.asarray, prefix))


@pytest.mark.slow
def test_robust_accuracy_curve_runs_square_as_separate_runs():
  x, labels = _batch(3)
  grid = [0.0, 0.05, 0.1, 0.3]
  curve = np.asarray(attacks.robust_accuracy_curve(square, linear_logits, LINEAR_WEIGHTS, x,
                                                   labels, grid, key=KEY, queries=QUERIES))
  separate = [1 - np.mean(square(linear_logits, LINEAR_WEIGHTS, x, labels, key=KEY, eps=eps,
                                 queries=QUERIES).success) for eps in grid]
  np.testing.assert_allclose(curve, separate)
  assert np.all(np.diff(curve) <= 0) and curve[-1] < curve[0]


def test_breaks_a_step_function_model_whose_gradient_is_zero():
  x, _ = _batch(4, 32)
  labels = np.argmax(np.asarray(quantized_logits(LINEAR_WEIGHTS, x)), -1)  # All right on x.
  gradient = jax.grad(lambda x: jnp.sum(quantized_logits(LINEAR_WEIGHTS, x) ** 2))(x)
  assert not np.any(gradient)  # Gradient attacks cannot move (see the CNN test below).
  result = square(quantized_logits, LINEAR_WEIGHTS, x, labels, key=KEY, eps=0.3, queries=QUERIES)
  _check_result(result, quantized_logits, LINEAR_WEIGHTS, x, labels, 0.3, "linf", QUERIES)
  assert np.mean(result.success) > 0.5


@pytest.mark.slow
def test_restarts_keep_the_first_success_and_only_add_more():
  x, _ = _batch(8)
  labels = np.argmax(np.asarray(linear_logits(LINEAR_WEIGHTS, x)), -1)
  once, thrice = (square(linear_logits, LINEAR_WEIGHTS, x, labels, key=KEY, eps=0.06, queries=20,
                         restarts=restarts) for restarts in (1, 3))
  won = np.asarray(once.success)
  assert 0 < won.sum() < np.sum(thrice.success) < len(won)
  np.testing.assert_array_equal(thrice.adversarial[won], once.adversarial[won])
  np.testing.assert_array_equal(thrice.steps_used[won], once.steps_used[won])
  late = np.asarray(thrice.success) & ~won
  assert np.all((thrice.steps_used[late] > 20) & (thrice.steps_used[late] <= 60))
  assert np.all(thrice.steps_used[~np.asarray(thrice.success)] == 60)


def test_the_registry_entry_reads_runs_and_describes_square():
  section = ml_collections.ConfigDict({"queries": 30, "p_init": 0.5, "restarts": 2})
  spec = specs.spec_from_config("square", "l2", section, "robustness.square")
  assert (spec.steps, spec.p_init, spec.restarts) == (30, 0.5, 2)
  assert spec.describe() == "square l2, 30 queries, p_init 0.5, 2 restarts"
  assert specs.spec_from_config("square", "linf", None, "robustness.square").describe() == (
      "square linf, 5000 queries, p_init 0.8, 1 restart")
  assert "square" in specs.UNTARGETED and specs.SECTIONS["square"] == "square"
  spec = specs.AttackSpec("square", norm="l2", steps=QUERIES, p_init=0.5)
  x, labels = _batch(7)
  chex.assert_trees_all_equal(
      spec.run(linear_logits, LINEAR_WEIGHTS, x, labels, KEY, 0.5),
      square(linear_logits, LINEAR_WEIGHTS, x, labels, key=KEY, eps=0.5, queries=QUERIES,
             norm="l2", p_init=0.5))
  for key, value, message in (
      ("queries", 0, "robustness.square.queries must be an integer > 0, got 0"),
      ("p_init", 1.5, "robustness.square.p_init must be in (0, 1], got 1.5"),
      ("p_init", 0.0, "robustness.square.p_init must be"),  # Named by its config key.
      ("restarts", 1.0, "robustness.square.restarts must be an integer > 0, got 1.0")):
    with pytest.raises(ConfigError) as error:
      specs.spec_from_config("square", "linf", ml_collections.ConfigDict({key: value}),
                             "robustness.square")
    assert message in one_line(error)


@pytest.mark.parametrize("change, message", [
    (dict(queries=0), "queries must be an integer > 0, got 0"),
    (dict(restarts=0), "restarts must be an integer > 0, got 0"),
    (dict(p_init=1.5), "p_init must be a number in (0, 1], got 1.5"),
    (dict(p_init=0.0), "p_init must be a number in (0, 1], got 0.0"),
    (dict(key=None), "key must be a PRNG key"),
    (dict(eps=-0.1), "eps must be >= 0, got -0.1"),
    (dict(norm="l1"), "norm='l1' is not valid; choose one of: linf, l2"),
    (dict(x=np.full((3, 16), 0.5, np.float32)), "x must be NHWC images [N, H, W, C]"),
])
def test_bad_arguments_give_one_line_config_errors(change, message):
  kwargs = dict(x=np.full((3, 4, 4, 1), 0.5, np.float32), key=KEY, eps=0.1, queries=5)
  kwargs.update(change)
  with pytest.raises(ConfigError) as error:
    square(linear_logits, LINEAR_WEIGHTS, kwargs.pop("x"), np.array([0, 1, 2]), **kwargs)
  assert message in one_line(error)


@pytest.mark.slow
def test_square_breaks_the_digits_cnn_and_stops_early(cnn):
  right = cnn.predictions(cnn.x) == np.asarray(cnn.labels)
  for norm, eps in (("linf", 0.1), ("l2", 0.6)):  # Budgets where some digits survive.
    result = square(cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, key=KEY, eps=eps,
                    queries=1000, norm=norm)
    _check_result(result, cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, eps, norm, 1000)
    robust = 1 - np.mean(result.success)
    apgd = 1 - np.mean(attacks.apgd_ce(cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, key=KEY,
                                       eps=eps, steps=100, norm=norm).success)
    print(f"{norm} eps={eps}: accuracy {np.mean(right):.3f}, square (1000 queries) {robust:.3f},"
          f" apgd_ce (100 steps) {apgd:.3f}")
    assert 0 < robust < 0.5 * np.mean(right), norm
    assert robust <= apgd + 0.15, norm  # Without gradients, nearly as strong as APGD here.
    won = np.asarray(result.success) & right
    assert np.median(result.steps_used[won]) < 200, norm  # Early stop saves most queries.


@pytest.mark.slow
def test_square_breaks_the_cnn_behind_stop_gradient_where_pgd_cannot(cnn):
  def frozen(variables, x):
    return jax.lax.stop_gradient(cnn.logits_fn(variables, x))

  wrong = cnn.predictions(cnn.x) != np.asarray(cnn.labels)
  pgd = attacks.pgd(frozen, cnn.variables, cnn.x, cnn.labels, key=KEY, eps=0.3,
                    step_size=0.03, steps=20, random_start=False)
  np.testing.assert_array_equal(pgd.success, wrong)  # Zero gradient: it never moves.
  result = square(frozen, cnn.variables, cnn.x, cnn.labels, key=KEY, eps=0.3, queries=1000)
  assert np.mean(result.success[~wrong]) > 0.5
  other = square(frozen, cnn.variables, cnn.x, cnn.labels, key=jax.random.key(7), eps=0.3,
                 queries=1000)
  assert not np.array_equal(result.adversarial, other.adversarial)

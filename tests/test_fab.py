"""FAB-T: the minimal-norm projections onto a hyperplane within the box (against linear programming,
constrained least squares, closed forms and sampling), the closed-form minimal perturbation of
linear models, the eps-ball and box, eps monotonicity on a small CNN trained on digits, the
registry entry and argument errors."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.optimize import linprog, minimize

from adcorda_jax import attacks
from adcorda_jax.attacks import fab, norms, specs
from adcorda_jax.errors import ConfigError
from tests.helpers import one_line
from tests.test_attacks import TrainedCNN

TOLERANCE = 1e-6
KEY = jax.random.key(0)


def linear_logits(weights, x):
  """A linear 4-class model on flattened 4x4 images (as in test_attacks)."""
  return x.reshape(len(x), -1) @ weights


LINEAR_WEIGHTS = jax.random.normal(jax.random.key(1), (16, 4))


def affine_logits(params, x):
  weights, bias = params
  return x.reshape(len(x), -1) @ weights + bias


# ---------------------------------------------------------------------------------------------
# The projection onto {z : w.z + b = 0} within [0, 1], minimal in linf or l2.


def _problems(seed, rows, dims):
  """Random points in the box (some on its faces), weights (some zero) and offsets, float64."""
  rng = np.random.default_rng(seed)
  points = rng.uniform(0, 1, (rows, dims))
  points[rng.uniform(size=points.shape) < 0.15] = 0.0
  points[rng.uniform(size=points.shape) < 0.15] = 1.0
  w = rng.normal(size=(rows, dims))
  w[rng.uniform(size=w.shape) < 0.15] = 0.0
  b = rng.normal(size=rows) * np.sqrt(dims) * rng.choice([0.1, 0.5, 1.0], rows)
  return points, w, b


def _feasible(w, b):
  """Whether some point of the box lies on the hyperplane, per row."""
  low = b + np.minimum(w, 0).sum(1)
  high = b + np.maximum(w, 0).sum(1)
  return (low <= 0) & (high >= 0)


_minimal_step = jax.jit(fab.minimal_step_to_hyperplane, static_argnames="norm")
_project = jax.jit(fab.project_onto_hyperplane_box, static_argnames="norm")


def _step(points, w, b, norm):
  return np.asarray(_minimal_step(jnp.asarray(points, jnp.float32), jnp.asarray(w, jnp.float32),
                                  jnp.asarray(b, jnp.float32), norm), np.float64)


def _norm(delta, norm):
  return np.abs(delta).max(-1) if norm == "linf" else np.linalg.norm(delta, axis=-1)


def _box_bounds(point):
  return [(-p, 1.0 - p) for p in point]


def _linf_by_linprog(point, w, b):
  """min s s.t. |d_i| <= s, w.(point + d) + b = 0, 0 <= point + d <= 1."""
  dims = len(point)
  cost = np.r_[np.zeros(dims), 1.0]
  bound_by_s = np.block([[np.eye(dims), -np.ones((dims, 1))], [-np.eye(dims), -np.ones((dims, 1))]])
  solution = linprog(cost, A_ub=bound_by_s, b_ub=np.zeros(2 * dims), A_eq=np.r_[w, 0.0][None],
                     b_eq=[-b - w @ point], bounds=_box_bounds(point) + [(0, None)])
  assert solution.status == 0
  return solution.fun


def _l2_by_slsqp(point, w, b):
  """min ||d||_2 s.t. w.(point + d) + b = 0, 0 <= point + d <= 1, by SLSQP."""
  solution = minimize(lambda d: d @ d, np.zeros(len(point)), jac=lambda d: 2 * d,
                      method="SLSQP", bounds=_box_bounds(point),
                      constraints=[{"type": "eq", "fun": lambda d: w @ (point + d) + b,
                                    "jac": lambda d: w}],
                      options={"ftol": 1e-14, "maxiter": 500})
  assert solution.success
  return np.sqrt(solution.fun)


@pytest.mark.parametrize("norm", norms.NORMS)
@pytest.mark.parametrize("seed, dims", [(0, 1), (1, 3), (2, 8)])
def test_projection_is_the_minimal_norm_point_of_the_hyperplane_in_the_box(norm, seed, dims):
  points, w, b = _problems(seed, 60, dims)
  step = _step(points, w, b, norm)
  moved = points + step
  assert np.all(moved >= -TOLERANCE) and np.all(moved <= 1 + TOLERANCE)
  feasible = _feasible(w, b)
  assert 10 < feasible.sum() < len(feasible)  # Both cases occur.
  residual = np.abs(np.sum(w * moved, 1) + b)
  assert np.all(residual[feasible] <= 1e-5 * (1 + np.abs(w).sum(1))[feasible])
  solve = _linf_by_linprog if norm == "linf" else _l2_by_slsqp
  for row in np.flatnonzero(feasible):
    best = solve(points[row], w[row], b[row])
    np.testing.assert_allclose(_norm(step[row], norm), best, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", norms.NORMS)
def test_projection_has_the_closed_form_where_the_box_does_not_bind(norm):
  rng = np.random.default_rng(3)
  points = rng.uniform(0.4, 0.6, (50, 20))
  w = rng.normal(size=(50, 20))
  b = -np.sum(w * points, 1) + rng.uniform(-0.05, 0.05, 50)  # Planes just off the points.
  value = np.sum(w * points, 1) + b
  step = _step(points, w, b, norm)
  if norm == "linf":  # |value| / ||w||_1 along -sign(w) * sign(value).
    expected = -(value / np.abs(w).sum(1))[:, None] * np.sign(w)
  else:  # The orthogonal projection.
    expected = -(value / np.sum(w * w, 1))[:, None] * w
  np.testing.assert_allclose(step, expected, atol=1e-6)


@pytest.mark.parametrize("norm", norms.NORMS)
def test_no_sampled_point_of_the_hyperplane_in_the_box_is_closer(norm):
  points, w, b = _problems(4, 12, 3)
  step = _step(points, w, b, norm)
  rng = np.random.default_rng(5)
  checked = 0
  for row in np.flatnonzero(_feasible(w, b) & np.any(w != 0, 1)):
    point, normal, offset = points[row], w[row], b[row]
    # Uniform box points and points around the solution, slid along w onto the hyperplane.
    samples = np.concatenate([rng.uniform(0, 1, (4000, 3)),
                              point + step[row] + rng.normal(0, 0.02, (4000, 3))])
    samples -= ((samples @ normal + offset) / (normal @ normal))[:, None] * normal
    samples = samples[np.all((samples >= 0) & (samples <= 1), 1)]
    assert len(samples) > 100
    assert np.min(_norm(samples - point, norm)) >= _norm(step[row], norm) - 1e-6
    checked += 1
  assert checked >= 4


@pytest.mark.parametrize("norm", norms.NORMS)
def test_projection_corner_cases(norm):
  # Unreachable plane: the box corner nearest to it, i.e. every coordinate with w != 0 at the
  # face towards the plane (as the reference does); w = 0 and points on the plane never move.
  points = np.array([[0.2, 0.7, 0.5], [0.2, 0.7, 0.5], [0.2, 0.7, 0.5], [0.25, 0.25, 0.25]])
  w = np.array([[1.0, -2.0, 0.0], [1.0, -2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
  b = np.array([5.0, -5.0, 1.0, -0.75])
  step = _step(points, w, b, norm)
  assert np.all(np.isfinite(step))
  # Lower w.z as far as the box allows, or raise it (float32 steps: 0.2 - 0.2f is not 0).
  np.testing.assert_allclose(points[0] + step[0], [0.0, 1.0, 0.5], atol=1e-7)
  np.testing.assert_allclose(points[1] + step[1], [1.0, 0.0, 0.5], atol=1e-7)
  np.testing.assert_array_equal(step[2:], 0.0)  # No plane at all; already on the plane.
  # Rows are independent: each alone gives the same step as in the batch.
  for row in range(len(points)):
    np.testing.assert_array_equal(_step(points[row:row + 1], w[row:row + 1], b[row:row + 1],
                                        norm)[0], step[row])
  projected = _project(jnp.asarray(points, jnp.float32), jnp.asarray(w, jnp.float32),
                       jnp.asarray(b, jnp.float32), norm)
  np.testing.assert_allclose(projected, points + step, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# FAB-T on linear models, where the minimal perturbation has a closed form.


def _linear_problem(classes, seed=0, batch=16):
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=(16, classes)).astype(np.float32)
  # Boundaries near the centre of the box, which holds every x within 0.1.
  bias = (-0.5 * weights.sum(0) + 0.3 * rng.normal(size=classes)).astype(np.float32)
  x = (0.5 + 0.1 * rng.uniform(-1, 1, (batch, 4, 4, 1))).astype(np.float32)
  logits = x.reshape(batch, -1) @ weights + bias
  labels = logits.argmax(1).astype(np.int32)
  return (jnp.asarray(weights), jnp.asarray(bias)), jnp.asarray(x), labels, logits


def _closest_boundary(params, labels, logits, norm):
  """[N]: min over t != y of (z_y - z_t) / ||w_y - w_t||_dual, the minimal perturbation."""
  weights = np.asarray(params[0], np.float64)
  distances = np.full(len(labels), np.inf)
  for i, label in enumerate(labels):
    for target in range(weights.shape[1]):
      if target != label:
        normal = weights[:, label] - weights[:, target]
        dual = np.abs(normal).sum() if norm == "linf" else np.linalg.norm(normal)
        distances[i] = min(distances[i], (logits[i, label] - logits[i, target]) / dual)
  return distances


@pytest.mark.slow
@pytest.mark.parametrize("norm", norms.NORMS)
def test_two_classes_give_the_closed_form_minimal_perturbation(norm):
  params, x, labels, logits = _linear_problem(classes=2)
  minimal = _closest_boundary(params, labels, logits, norm)
  assert minimal.max() < 0.38  # x is within 0.1 of 0.5: the box never binds, even overshot.
  result = fab.fab_t(affine_logits, params, x, labels, key=None, eps=10.0, norm=norm)
  assert np.all(result.success)
  # The reference's iteration settles about 0.5% outside the boundary (eta = 1.05, beta = 0.9).
  np.testing.assert_allclose(result.perturbation_norm, minimal, rtol=0.01)
  assert np.all(np.asarray(result.perturbation_norm) >= minimal * (1 - 1e-5))


@pytest.mark.slow
@pytest.mark.parametrize("norm", norms.NORMS)
def test_found_within_eps_hits_the_closest_boundary_over_the_target_classes(norm):
  params, x, labels, logits = _linear_problem(classes=5)
  minimal = _closest_boundary(params, labels, logits, norm)
  # Per-example eps 3% above the true minimum: only the run towards the closest boundary (or one
  # as close) can succeed, and it does; 3% below nothing can.
  above = fab.fab_t(affine_logits, params, x, labels, key=None, eps=1.03 * minimal, norm=norm,
                    target_classes=4)
  assert np.all(above.success)
  found = np.asarray(above.perturbation_norm)
  assert np.all((found >= minimal * (1 - 1e-5)) & (found <= 1.03 * minimal + TOLERANCE))
  assert np.all((above.steps_used >= 1) & (above.steps_used <= 4 * 100))
  below = fab.fab_t(affine_logits, params, x, labels, key=None, eps=0.97 * minimal, norm=norm,
                    target_classes=4)
  assert not np.any(below.success)
  np.testing.assert_array_equal(below.adversarial, x)
  np.testing.assert_array_equal(below.steps_used, 4 * 100)
  np.testing.assert_array_equal(below.perturbation_norm, 0.0)


@pytest.mark.slow
def test_target_classes_are_capped_and_clean_mistakes_are_left_alone():
  params, x, labels, _ = _linear_problem(classes=3, batch=8)
  wrong = np.arange(8) < 3
  labels = np.where(wrong, (labels + 1) % 3, labels).astype(np.int32)
  capped, exact = (fab.fab_t(affine_logits, params, x, labels, key=None, eps=0.05, steps=20,
                             target_classes=k) for k in (9, 2))
  chex.assert_trees_all_equal(capped, exact)
  np.testing.assert_array_equal(capped.adversarial[wrong], x[wrong])
  assert np.all(capped.success[wrong]) and np.all(capped.steps_used[wrong] == 0)
  assert np.all((capped.steps_used[~wrong] > 0) & (capped.steps_used[~wrong] <= 40))


# ---------------------------------------------------------------------------------------------
# The eps-ball and the box, restarts, determinism.


def _check_ball_and_box(norm, batch, eps, per_example, restarts, seed, steps=10):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.uniform(keys[0], (batch, 4, 4, 1))
  x = jnp.where(x < 0.2, 0.0, jnp.where(x > 0.8, 1.0, x))  # Pixels at both range limits.
  labels = jax.random.randint(keys[1], (batch,), 0, 4)
  eps = np.linspace(0.0, eps, batch).astype(np.float32) if per_example else eps
  result = fab.fab_t(linear_logits, LINEAR_WEIGHTS, x, labels, key=keys[2], eps=eps,
                     steps=steps, norm=norm, restarts=restarts)
  chex.assert_shape(result.adversarial, x.shape)
  assert result.adversarial.dtype == x.dtype
  assert float(result.adversarial.min()) >= 0.0 and float(result.adversarial.max()) <= 1.0
  found = np.asarray(norms.perturbation_norm(result.adversarial - x, norm))
  np.testing.assert_allclose(result.perturbation_norm, found, atol=1e-6)
  assert np.all(found <= np.broadcast_to(eps, (batch,)) + TOLERANCE)
  predictions = np.asarray(jnp.argmax(linear_logits(LINEAR_WEIGHTS, result.adversarial), -1))
  np.testing.assert_array_equal(result.success, predictions != np.asarray(labels))
  moved = found > 0
  assert np.all(result.success[moved])  # Only broken examples move.
  assert np.all((0 <= np.asarray(result.steps_used))
                & (result.steps_used <= steps * 3 * restarts))


@pytest.mark.slow
@settings(max_examples=15, deadline=None)
@given(norm=st.sampled_from(norms.NORMS), batch=st.sampled_from([3, 5]),
       eps=st.floats(0.0, 1.5), per_example=st.booleans(), restarts=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_adversarials_stay_in_the_ball_and_image_range(norm, batch, eps, per_example, restarts,
                                                        seed):
  _check_ball_and_box(norm, batch, eps, per_example, restarts, seed)


@pytest.mark.parametrize("norm, eps, per_example, restarts", [
    ("linf", 0.3, True, 2), pytest.param("l2", 1.0, False, 1, marks=pytest.mark.slow)])
def test_one_case_stays_in_the_ball_and_image_range(norm, eps, per_example, restarts):
  """One fixed case per norm (the linf one in the fast tier); the property test explores more."""
  _check_ball_and_box(norm, 5, eps, per_example, restarts, seed=0)


def test_same_key_gives_bit_identical_results():
  # The program of the fast linf case above (same shapes and settings): no second compile.
  x = jax.random.uniform(jax.random.key(2), (5, 4, 4, 1))
  labels = jnp.argmax(linear_logits(LINEAR_WEIGHTS, x), -1)
  first, again = (fab.fab_t(linear_logits, LINEAR_WEIGHTS, x, labels, key=KEY, eps=0.05,
                            steps=10, norm="linf", restarts=2) for _ in range(2))
  chex.assert_trees_all_equal(first, again)
  assert 0 < np.sum(first.success) < len(x)


@pytest.mark.slow
def test_per_example_eps_and_the_curve_equal_separate_runs():
  params, x, labels, _ = _linear_problem(classes=5)
  grid = [0.0, 0.05, 0.1, 0.15, 0.3]
  eps = np.asarray(grid, np.float32)[np.arange(len(x)) % len(grid)]
  kwargs = dict(key=None, steps=30, target_classes=4)
  mixed = fab.fab_t(affine_logits, params, x, labels, eps=eps, **kwargs)
  separate = [fab.fab_t(affine_logits, params, x, labels, eps=value, **kwargs) for value in grid]
  for value, alone in zip(grid, separate):
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a[eps == value], mixed),
                                jax.tree.map(lambda a: a[eps == value], alone))
  for smaller, larger in zip(separate, separate[1:]):  # One restart: success only grows.
    assert np.all(larger.success[np.asarray(smaller.success)])
  curve = attacks.robust_accuracy_curve(fab.fab_t, affine_logits, params, x, labels, grid,
                                        **kwargs)
  np.testing.assert_allclose(curve, [1 - np.mean(r.success) for r in separate], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A small CNN trained on digits.


@pytest.fixture(scope="module")
def cnn():
  trained = TrainedCNN()
  assert np.mean(trained.predictions(trained.x) == np.asarray(trained.labels)) > 0.85
  return trained


@pytest.mark.slow
@pytest.mark.parametrize("norm, grid", [("linf", (0.0, 0.05, 0.1, 0.2)),
                                        ("l2", (0.0, 0.5, 1.0, 2.0))])
def test_fab_t_breaks_the_cnn_and_never_loses_a_success_as_eps_grows(cnn, norm, grid):
  results = [fab.fab_t(cnn.logits_fn, cnn.variables, cnn.x, cnn.labels, key=KEY, eps=eps,
                       steps=20, norm=norm, target_classes=3) for eps in grid]
  clean_wrong = cnn.predictions(cnn.x) != np.asarray(cnn.labels)
  np.testing.assert_array_equal(results[0].success, clean_wrong)
  np.testing.assert_array_equal(results[0].adversarial, cnn.x)
  for eps, result in zip(grid, results):
    np.testing.assert_array_equal(result.success,
                                  cnn.predictions(result.adversarial) != cnn.labels)
    assert np.all(np.asarray(result.perturbation_norm) <= eps + TOLERANCE)
  for smaller, larger in zip(results, results[1:]):
    assert np.all(larger.success[np.asarray(smaller.success)])
  assert np.mean(results[2].success) > np.mean(clean_wrong) + 0.3  # A substantial share.
  assert np.mean(results[-1].success) > 0.9


# ---------------------------------------------------------------------------------------------
# The registry entry and argument errors.


@pytest.mark.slow
def test_the_spec_runs_fab_t():
  spec = specs.AttackSpec(name="fab_t", steps=20, target_classes=3)
  assert spec.describe() == "fab_t linf, 20 steps, 3 target classes, 1 restart"
  params, x, labels, _ = _linear_problem(classes=4, batch=6)
  via_spec = spec.run(affine_logits, params, x, jnp.asarray(labels), KEY, 0.015)
  direct = fab.fab_t(affine_logits, params, x, labels, key=KEY, eps=0.015, steps=20,
                     target_classes=3)
  chex.assert_trees_all_equal(via_spec, direct)
  assert 0 < np.sum(direct.success) < len(x)


def test_the_spec_reads_its_section():
  default = specs.spec_from_config("fab_t", "l2", None, "robustness.fab")
  assert default.describe() == "fab_t l2, 100 steps, 9 target classes, 1 restart"
  assert (default.alpha_max, default.eta, default.beta) == (0.1, 1.05, 0.9)
  section = ml_collections.ConfigDict({"steps": 5, "restarts": 2, "target_classes": 4,
                                       "alpha_max": 0.2, "eta": 1.1, "beta": 0.5})
  read = specs.spec_from_config("fab_t", "linf", section, "robustness.fab")
  assert read == specs.AttackSpec(name="fab_t", steps=5, restarts=2, target_classes=4,
                                  alpha_max=0.2, eta=1.1, beta=0.5)


@pytest.mark.parametrize("fields, message", [
    ({"steps": 0}, "robustness.fab.steps must be an integer > 0, got 0"),
    ({"target_classes": 1.5}, "robustness.fab.target_classes must be an integer > 0, got 1.5"),
    ({"alpha_max": 0.0}, "robustness.fab.alpha_max must be > 0, got 0.0"),
    ({"beta": 1.5}, "robustness.fab.beta must be in (0, 1], got 1.5"),
    ({"eta": 0.9}, "robustness.fab.eta must be >= 1, got 0.9"),
    ({"eta": "big"}, "robustness.fab.eta must be a finite number, got 'big'"),
])
def test_bad_config_keys_give_one_line_errors(fields, message):
  with pytest.raises(ConfigError) as error:
    specs.spec_from_config("fab_t", "linf", ml_collections.ConfigDict(fields), "robustness.fab")
  assert message in one_line(error)


@pytest.mark.parametrize("change, message", [
    (dict(eps=-0.1), "eps must be >= 0, got -0.1"),
    (dict(norm="l1"), "norm='l1' is not valid; choose one of: linf, l2"),
    (dict(steps=0), "steps must be an integer > 0, got 0"),
    (dict(restarts=0), "restarts must be an integer > 0, got 0"),
    (dict(target_classes=0), "target_classes must be an integer > 0, got 0"),
    (dict(alpha_max=0.0), "alpha_max must be a number in (0, 1], got 0.0"),
    (dict(beta=1.5), "beta must be a number in (0, 1], got 1.5"),
    (dict(eta=0.5), "eta must be a finite number >= 1, got 0.5"),
    (dict(labels=np.array([0, 1, 4])), "labels must be in [0, 4), got 4"),
    (dict(x=np.full((3, 4, 4, 1), 1.5, np.float32)), "x must lie in [0, 1]"),
    (dict(key=None, restarts=2), "key must be a PRNG key"),
])
def test_bad_arguments_give_one_line_config_errors(change, message):
  kwargs = dict(x=np.full((3, 4, 4, 1), 0.5, np.float32), labels=np.array([0, 1, 2]), key=KEY,
                eps=0.1, steps=5, norm="linf")
  kwargs.update(change)
  with pytest.raises(ConfigError) as error:
    fab.fab_t(linear_logits, LINEAR_WEIGHTS, kwargs.pop("x"), kwargs.pop("labels"), **kwargs)
  assert message in one_line(error)

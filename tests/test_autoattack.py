"""AutoAttack: DLR losses, APGD-T, the survivor cascade over a split, its flags and configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from adcorda_jax.attacks import apgd, driver, ensemble, flags, specs
from adcorda_jax.attacks.losses import dlr_loss, ranked_class, targeted_dlr_loss
from adcorda_jax.errors import ConfigError
from adcorda_jax.training import sharding
from tests.helpers import one_line
from tests.test_attack_driver import REPO, digits_problem, linear_logits

KEY = jax.random.key(5)
EPS = 0.1
# Short components, so the whole cascade runs in seconds on the linear digits model.
SHORT = {"apgd": {"steps": 10}, "apgd_t": {"steps": 10, "target_classes": 3},
         "fab": {"steps": 10, "target_classes": 3}, "square": {"queries": 200}}


def short_spec(version="standard", attacks=None):
  return ensemble.autoattack_spec("linf", version, attacks, SHORT)


@pytest.fixture(scope="module")
def problem():
  return digits_problem()


def _split(problem, spec, batch_size=16, **kwargs):
  params, images, labels = problem
  return driver.attack_split(spec, linear_logits, params, images, labels, eps=EPS,
                             batch_size=batch_size, key=KEY, mesh=sharding.make_mesh(), **kwargs)


def _numpy_dlr(logits, labels, targets=None):
  ordered = np.sort(logits, axis=1)[:, ::-1]
  true = logits[np.arange(len(logits)), labels]
  if targets is not None:
    target = logits[np.arange(len(logits)), targets]
    return -(true - target) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12)
  other = np.where(np.arange(logits.shape[1])[None] == labels[:, None], -np.inf, logits).max(1)
  return -(true - other) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), classes=st.integers(4, 12), scale=st.floats(0.1, 30.0))
def test_dlr_losses_match_the_numpy_formulas(seed, classes, scale):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(7, classes)) * scale).astype(np.float32)
  labels = rng.integers(0, classes, 7).astype(np.int32)
  targets = (labels + rng.integers(1, classes, 7)) % classes
  np.testing.assert_allclose(dlr_loss(jnp.asarray(logits), jnp.asarray(labels)),
                             _numpy_dlr(logits, labels), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      targeted_dlr_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(targets)),
      _numpy_dlr(logits, labels, targets), rtol=1e-5, atol=1e-6)
  # DLR is invariant to shifting and (positively) scaling the logits.
  np.testing.assert_allclose(dlr_loss(jnp.asarray(logits * 3 + 2), jnp.asarray(labels)),
                             _numpy_dlr(logits, labels), rtol=1e-4, atol=1e-5)


def test_ranked_class_gives_the_runner_up_classes_in_order():
  logits = jnp.asarray([[0.1, 3.0, 2.0, -1.0], [5.0, 1.0, 4.0, 4.5]])
  np.testing.assert_array_equal(ranked_class(logits, 0), [1, 0])
  np.testing.assert_array_equal(ranked_class(logits, 1), [2, 3])
  np.testing.assert_array_equal(ranked_class(logits, 3), [3, 1])


@pytest.mark.slow
def test_apgd_t_raises_the_targeted_loss_of_its_target(problem):
  params, images, labels = problem
  x = jnp.asarray(images)
  clean = linear_logits(params, x)
  targets = ranked_class(clean, 1)
  result = apgd.apgd(linear_logits, params, x, labels, key=KEY, eps=0.03, steps=20,
                     loss="dlr_targeted", target_classes=1, early_stop=False)
  before = targeted_dlr_loss(clean, jnp.asarray(labels), targets)
  after = targeted_dlr_loss(linear_logits(params, result.adversarial), jnp.asarray(labels),
                            targets)
  attacked = np.asarray(jnp.argmax(clean, -1) == labels)
  assert np.all(np.asarray(after)[attacked] >= np.asarray(before)[attacked] - 1e-6)
  assert np.mean(np.asarray(after > before + 1e-3)[attacked]) > 0.9


def test_dlr_losses_refuse_models_with_too_few_classes():
  weights = jnp.ones((16, 3))
  x = jnp.zeros((2, 4, 4, 1))
  with pytest.raises(ConfigError) as error:
    apgd.apgd(lambda w, x: x.reshape(len(x), -1) @ w, weights, x, jnp.zeros(2, jnp.int32), key=KEY,
              eps=0.1, loss="dlr_targeted")
  assert one_line(error) == "the dlr_targeted loss needs at least 4 classes; the model has 3"


@pytest.mark.slow
def test_cascade_attacks_only_survivors_and_is_at_most_each_component(problem, tmp_path):
  spec = short_spec()
  result = _split(problem, spec, out_dir=tmp_path / "aa")
  cascade = result.details["cascade"]
  assert [step["attack"] for step in cascade] == list(ensemble.STANDARD)
  # Each attack sees exactly the points still robust after the previous ones.
  robust = int(result.clean_correct.sum())
  for index, step in enumerate(cascade):
    assert step["attacked"] == (len(result.success) if index == 0 else robust)
    robust -= step["broken"]
    assert step["robust_accuracy"] == pytest.approx(robust / len(result.success))
    if step["attacked"]:
      folder = tmp_path / "aa" / ensemble.COMPONENTS_DIR / f"{index}_{step['attack']}"
      assert json.loads((folder / driver.FINGERPRINT_FILE).read_text())["num_examples"] == (
          step["attacked"])
  assert result.final_accuracy == pytest.approx(robust / len(result.success))
  assert cascade[0]["broken"] > 0 and sum(step["broken"] for step in cascade[1:]) >= 0
  # A point is robust only if no attack broke it; every component alone is no stronger.
  for index, component in enumerate(spec.components):
    single = driver.attack_split(component, linear_logits, problem[0], problem[1], problem[2],
                                 eps=EPS, batch_size=16, key=jax.random.fold_in(KEY, index),
                                 mesh=sharding.make_mesh())
    assert result.final_accuracy <= single.final_accuracy + 1e-9, component.name
    if index == 0:  # The first attack runs on every point exactly as alone: a subset.
      assert np.all(result.final_correct <= single.final_correct)
  assert np.all(result.final_correct <= result.clean_correct)
  broken = result.details["broken_by"]
  np.testing.assert_array_equal(broken >= 0, result.clean_correct & ~result.final_correct)


@pytest.mark.slow
def test_cascade_is_deterministic_and_resumes_per_attack_and_batch(problem, tmp_path):
  spec = short_spec()
  full = _split(problem, spec, save_adversarial=True)

  class Stop(Exception):
    pass

  calls = []

  def stop_in_third_attack(index):
    calls.append(index)
    if len(calls) == 5:  # After the first attack's 4 batches and one of the next.
      raise Stop

  with pytest.raises(Stop):
    _split(problem, spec, out_dir=tmp_path, save_adversarial=True,
           batch_callback=stop_in_third_attack)
  resumed = _split(problem, spec, out_dir=tmp_path, save_adversarial=True)
  assert resumed.loaded_batches >= 5
  for name in list(driver.PER_EXAMPLE) + ["adversarial"]:
    np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name), err_msg=name)
  assert resumed.details["cascade"][1]["broken"] == full.details["cascade"][1]["broken"]
  with np.load(tmp_path / driver.ARRAYS_FILE) as saved:
    np.testing.assert_array_equal(saved["final_correct"], full.final_correct)


@pytest.mark.slow
def test_batch_level_autoattack_matches_the_split_cascade_accuracy_bound(problem):
  params, images, labels = problem
  spec = short_spec(version="custom", attacks="apgd_ce,square")
  result = spec.run(linear_logits, params, jnp.asarray(images), jnp.asarray(labels), KEY, EPS)
  alone = spec.components[0].run(linear_logits, params, jnp.asarray(images),
                                 jnp.asarray(labels), jax.random.fold_in(KEY, 0), EPS)
  # The first success is kept: everything APGD broke stays broken, Square may add more.
  assert np.all(np.asarray(result.success) >= np.asarray(alone.success))
  assert np.all(np.asarray(result.perturbation_norm) <= EPS + 1e-6)


@pytest.mark.slow
def test_flags_fire_for_probabilities_zero_gradients_and_square_only_breaks(problem):
  params, images, labels = problem

  def softmax_model(p, x):
    return jax.nn.softmax(linear_logits(p, x))

  def masked_model(p, x):  # Gradient zero everywhere, same predictions.
    return jax.lax.stop_gradient(linear_logits(p, x))

  clean = flags.model_flags(linear_logits, params, images, labels)
  assert not clean["probability_outputs"] and not clean["randomized"]
  assert clean["zero_gradient_fraction"] == 0.0
  assert flags.model_flags(softmax_model, params, images, labels)["probability_outputs"]
  masked = flags.model_flags(masked_model, params, images, labels)
  assert masked["zero_gradient_fraction"] == 1.0
  # On the masked model APGD breaks only what its random start happens to; Square, far more.
  spec = short_spec(version="custom", attacks="apgd_ce,square")
  result = driver.attack_split(spec, masked_model, params, images, labels, eps=0.2,
                               batch_size=16, key=KEY, mesh=sharding.make_mesh())
  cascade = result.details["cascade"]
  assert cascade[1]["broken"] > 2 * cascade[0]["broken"]
  gains = flags.split_square_gains([("autoattack", 0.2, result)])
  reported = flags.report_flags(masked, gains, "test")
  assert gains["0.2"] == pytest.approx(cascade[1]["broken"] / len(labels))
  assert any("Square" in w for w in reported["warnings"])
  assert any("all-zero input gradient" in w for w in reported["warnings"])
  assert flags.report_flags(clean, {}, "test")["warnings"] == []


def test_autoattack_config_and_fingerprints():
  section = ml_collections.ConfigDict({
      "norm": "l2", "attacks": "autoattack",
      "autoattack": {"version": "custom", "attacks": "apgd_dlr,square",
                     "square": {"queries": 100}}})
  (spec,) = specs.attacks_from_config(section, "robustness", default="pgd")
  assert [(c.name, c.norm) for c in spec.components] == [("apgd_dlr", "l2"), ("square", "l2")]
  assert spec.components[1].steps == 100 and spec.components[0].steps == 100
  standard = specs.spec_from_config("autoattack", "linf", None, "robustness.autoattack")
  assert [c.name for c in standard.components] == list(ensemble.STANDARD)
  assert standard.components[1].target_classes == 9 and standard.components[3].steps == 5000
  assert "autoattack standard linf" in standard.describe()
  # Fields added for AutoAttack stay out of older attacks' fingerprints.
  assert set(specs.AttackSpec("pgd").as_dict()) == {
      "name", "norm", "steps", "step_size", "step_size_factor", "restarts", "random_start",
      "rho", "momentum", "early_stop"}
  assert specs.AttackSpec("apgd_t", target_classes=5).as_dict()["target_classes"] == 5
  for bad, message in [
      ({"version": "fast"}, "robustness.autoattack.version='fast' is not valid"),
      ({"version": "custom", "attacks": "apgd_ce,correct"},
       "unknown attack 'correct' (robustness.autoattack.attacks)"),
      ({"version": "custom", "attacks": "autoattack"},
       "unknown attack 'autoattack' (robustness.autoattack.attacks)"),
      ({"attacks": "apgd_ce"}, "robustness.autoattack.attacks is only read with"),
  ]:
    config = ml_collections.ConfigDict({"attacks": "autoattack", "autoattack": bad})
    with pytest.raises(ConfigError) as error:
      specs.attacks_from_config(config, "robustness", default="pgd")
    assert one_line(error).startswith(message)


_FOUR_DEVICES = """
import sys
import jax
import numpy as np
from adcorda_jax.attacks import driver
from adcorda_jax.training import sharding
from tests.test_autoattack import EPS, KEY, short_spec
from tests.test_attack_driver import digits_problem, linear_logits
assert jax.device_count() == 4, jax.devices()
params, images, labels = digits_problem()
result = driver.attack_split(short_spec(), linear_logits, params, images, labels, eps=EPS,
                             batch_size=16, key=KEY, mesh=sharding.make_mesh(),
                             out_dir=sys.argv[1])
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_one_and_four_devices_give_the_same_cascade(problem, tmp_path):
  single = _split(problem, short_spec())
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  with np.load(tmp_path / driver.ARRAYS_FILE) as four:
    np.testing.assert_array_equal(four["final_correct"], single.final_correct)
    np.testing.assert_array_equal(four["broken_by"], single.details["broken_by"])
    np.testing.assert_allclose(four["perturbation_norm"], single.perturbation_norm, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 7, 16])
def test_on_active_equals_the_full_batch_on_active_rows(batch):
  from adcorda_jax.attacks import compaction

  rng = np.random.default_rng(batch)
  x = jnp.asarray(rng.normal(size=(batch, 3)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)

  def fn(rows):
    return {"y": jnp.tanh(rows["x"] @ weights), "n": rows["n"] * 2}

  inputs = {"x": x, "n": jnp.arange(batch)}
  full = fn(inputs)
  run = jax.jit(lambda active: compaction.on_active(fn, active, inputs))
  # Every count, so each bucket (and its boundaries) is used, with active rows spread out.
  for count in range(batch + 1):
    active = np.zeros(batch, bool)
    active[rng.permutation(batch)[:count]] = True
    out = run(jnp.asarray(active))
    np.testing.assert_array_equal(np.asarray(out["n"])[active], np.asarray(full["n"])[active])
    np.testing.assert_allclose(np.asarray(out["y"])[active], np.asarray(full["y"])[active],
                               atol=1e-6)  # Fused differently under jit: float rounding.
  assert compaction.bucket_sizes(500) == (500, 250, 125, 63)


def test_survivors_are_rebatched_into_few_equal_batches_whatever_the_device_count():
  size = ensemble.survivor_batch_size
  assert [size(280, 500, d) for d in (1, 2, 4)] == [280, 280, 280]
  assert size(1000, 500, 1) == 500 and size(501, 500, 1) == 252
  assert [size(280, 256, d) for d in (1, 4)] == [192, 192]  # 2 batches of 140, multiples of 64.
  assert size(3, 16, 4) == 16

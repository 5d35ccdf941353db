"""Attack specs and the dataset-scale driver: batching and padding, per-batch keys, resume,
fingerprint guard, and 1 vs 4 devices, on a linear softmax model of the digits."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits

from adcorda_jax import attacks
from adcorda_jax.attacks import driver, specs
from adcorda_jax.errors import CheckpointError, ConfigError
from adcorda_jax.training import sharding
from tests.helpers import one_line

REPO = Path(__file__).resolve().parents[1]
KEY = jax.random.key(3)
EPS = 0.1
NUM_EXAMPLES = 50  # Batches of 16: three full ones and a last one with 2 real examples.


def linear_logits(params, x):
  """A linear softmax model on flattened 8x8 images (compiles in a blink, exact gradients)."""
  return x.reshape(len(x), -1) @ params["w"] + params["b"]


def digits_problem() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """(params, images, labels): a ridge-regression linear model fit on 1,500 digits, and 50
  held-out digits it mostly gets right."""
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  features = np.concatenate([images[:1500].reshape(1500, -1), np.ones((1500, 1))], axis=1)
  targets = np.eye(10)[labels[:1500]] * 8.0 - 4.0
  solution = np.linalg.solve(features.T @ features + np.eye(65), features.T @ targets)
  params = {"w": solution[:-1].astype(np.float32), "b": solution[-1].astype(np.float32)}
  held_out = slice(1500, 1500 + NUM_EXAMPLES)
  return params, images[held_out], labels[held_out]


PGD = specs.AttackSpec("pgd", steps=5)
CORRECT = specs.AttackSpec("correct", steps=8, random_start=False)


@pytest.fixture(scope="module")
def problem():
  params, images, labels = digits_problem()
  predictions = np.argmax(linear_logits(params, images), -1)
  assert 0.8 < np.mean(predictions == labels) < 1.0  # Some mistakes for correction to fix.
  return params, images, labels


def _attack(problem, spec=PGD, batch_size=16, **kwargs):
  params, images, labels = problem
  return driver.attack_split(spec, linear_logits, params, images, labels, eps=EPS,
                             batch_size=batch_size, key=KEY, mesh=sharding.make_mesh(),
                             **kwargs)


def _arrays(result):
  names = list(driver.PER_EXAMPLE) + (["adversarial"] if result.adversarial is not None else [])
  return {name: getattr(result, name) for name in names}


@pytest.mark.slow
def test_batches_equal_direct_pgd_calls_with_per_batch_keys_and_padding_never_counts(problem):
  params, images, labels = problem
  result = _attack(problem, save_adversarial=True)
  assert result.num_examples == NUM_EXAMPLES and result.computed_batches == 4
  for index, start in enumerate(range(0, NUM_EXAMPLES, 16)):
    real = slice(start, min(start + 16, NUM_EXAMPLES))
    # The driver pads the last batch with copies of its own examples (fixed shape, one compile).
    rows = start + np.arange(16) % (real.stop - start)
    direct = attacks.pgd(linear_logits, params, images[rows], labels[rows],
                         key=jax.random.fold_in(KEY, index), eps=EPS, step_size=2.5 * EPS / 5,
                         steps=5)
    count = real.stop - start
    np.testing.assert_array_equal(result.success[real], direct.success[:count])
    np.testing.assert_array_equal(result.steps_used[real], direct.steps_used[:count])
    np.testing.assert_allclose(result.adversarial[real], direct.adversarial[:count], atol=1e-6)
  clean = np.argmax(linear_logits(params, images), -1) == labels
  np.testing.assert_array_equal(result.clean_correct, clean)
  assert result.clean_accuracy == np.mean(clean)  # Over the 50 real examples only.
  assert result.robust_accuracy == np.mean(~result.success) < result.clean_accuracy
  broken = clean & result.success
  assert result.mean_perturbation_norm == pytest.approx(
      np.mean(result.perturbation_norm[broken]))
  assert np.all(result.perturbation_norm <= EPS + 1e-6)


@pytest.mark.slow
def test_deterministic_correction_does_not_depend_on_the_batch_size(problem):
  results = [_attack(problem, CORRECT, batch_size=size) for size in (7, 16, 64)]
  first = results[0]
  assert 0 < np.sum(~first.clean_correct) and first.final_accuracy > first.clean_accuracy
  np.testing.assert_array_equal(first.final_correct, first.success)  # Success = now right.
  assert np.all(first.steps_used[first.clean_correct] == 0)
  for other in results[1:]:
    for name in ("clean_correct", "success", "steps_used"):
      np.testing.assert_array_equal(getattr(other, name), getattr(first, name))
    np.testing.assert_allclose(other.perturbation_norm, first.perturbation_norm, atol=1e-6)


@pytest.mark.slow
def test_eps_zero_keeps_inputs_so_robust_accuracy_is_clean_accuracy(problem):
  params, images, labels = problem
  result = driver.attack_split(PGD, linear_logits, params, images, labels, eps=0.0,
                               batch_size=16, key=KEY, mesh=sharding.make_mesh(),
                               save_adversarial=True)
  np.testing.assert_array_equal(result.adversarial, images)
  assert result.robust_accuracy == result.clean_accuracy
  # Answered without stepping in place, with the outcome the attack itself gives at eps = 0.
  assert np.all(result.steps_used == 0) and np.all(result.perturbation_norm == 0)
  direct = attacks.pgd(linear_logits, params, images, labels, key=KEY, eps=0.0, step_size=0.1,
                       steps=2)
  np.testing.assert_array_equal(result.success, direct.success)
  np.testing.assert_array_equal(direct.adversarial, images)


class _Stop(Exception):
  """Raised from the batch callback to simulate a run killed mid-split."""


def test_interrupted_run_resumes_without_recomputing_and_matches_a_full_run(problem, tmp_path):
  full = _attack(problem, out_dir=tmp_path / "full", save_adversarial=True)

  def stop_after_batch_1(index):
    if index == 1:
      raise _Stop

  with pytest.raises(_Stop):
    _attack(problem, out_dir=tmp_path / "killed", save_adversarial=True,
            batch_callback=stop_after_batch_1)
  saved = sorted(p.name for p in (tmp_path / "killed" / driver.BATCH_DIR).iterdir())
  assert saved == ["batch_000000.npz", "batch_000001.npz"]
  computed = []
  resumed = _attack(problem, out_dir=tmp_path / "killed", save_adversarial=True,
                    batch_callback=computed.append)
  assert computed == [2, 3] and resumed.loaded_batches == 2 and resumed.computed_batches == 2
  for name, array in _arrays(full).items():
    np.testing.assert_array_equal(getattr(resumed, name), array, err_msg=name)
  assert (tmp_path / "killed" / driver.ARRAYS_FILE).exists()
  assert not (tmp_path / "killed" / driver.BATCH_DIR).exists()
  again = _attack(problem, out_dir=tmp_path / "killed", save_adversarial=True,
                  batch_callback=computed.append)
  assert computed == [2, 3] and again.computed_batches == 0
  for name, array in _arrays(full).items():
    np.testing.assert_array_equal(getattr(again, name), array, err_msg=name)
  assert again.seconds == resumed.seconds > 0


def test_a_different_run_in_the_same_directory_is_refused(problem, tmp_path):
  _attack(problem, CORRECT, out_dir=tmp_path)
  with pytest.raises(CheckpointError) as error:
    _attack(problem, specs.AttackSpec("correct", steps=9, random_start=False), out_dir=tmp_path)
  assert "the attack run in" in one_line(error)
  assert "was made with a different config (differs at: spec.steps)" in one_line(error)
  with pytest.raises(CheckpointError) as error:
    _attack(problem, CORRECT, batch_size=8, out_dir=tmp_path)
  assert "differs at: batch_size" in one_line(error)


def test_bad_driver_arguments_are_one_line_errors(problem):
  with pytest.raises(ConfigError) as error:
    _attack(problem, batch_size=0, batch_size_key="robustness.batch_size")
  assert one_line(error) == "robustness.batch_size must be an integer > 0, got 0"
  params, images, labels = problem
  with pytest.raises(ConfigError) as error:
    driver.attack_split(PGD, linear_logits, params, images, labels, eps=-0.5, batch_size=16,
                        key=KEY, mesh=sharding.make_mesh())
  assert one_line(error) == "eps must be a finite number >= 0, got -0.5"


def test_specs_from_config_validate_once_with_the_config_keys():
  section = ml_collections.ConfigDict({"steps": 7, "step_size_factor": 2.0, "restarts": 2})
  spec = specs.spec_from_config("pgd", "l2", section, "robustness.pgd")
  assert (spec.steps, spec.restarts, spec.norm, spec.random_start) == (7, 2, "l2", True)
  assert spec.describe() == "pgd l2, 7 steps of 2*eps/7, random start, 2 restarts"
  assert specs.spec_from_config("correct", "linf", None, "adcorda.correct").random_start is False
  hash(spec)  # A static argument of jax.jit.
  cases = [
      (lambda: specs.spec_from_config("pgd", "linf", ml_collections.ConfigDict({"steps": 0}),
                                      "robustness.pgd"),
       "robustness.pgd.steps must be an integer > 0, got 0"),
      (lambda: specs.spec_from_config(
          "apgd_ce", "linf", ml_collections.ConfigDict({"rho": 1.5}), "robustness.apgd"),
       "robustness.apgd.rho must be in (0, 1], got 1.5"),
      (lambda: specs.parse_attack_names("pgd,apgd", "robustness.attacks", specs.UNTARGETED),
       "unknown attack 'apgd' (robustness.attacks); valid names: fgsm, pgd, apgd_ce, apgd_dlr, "
       "apgd_t, fab_t, square, autoattack"),
      (lambda: specs.check_eps_grid((0.0, -1 / 255), "robustness.eps"),
       "robustness.eps must be a finite number >= 0, got -0.00392156862745098"),
      (lambda: specs.AttackSpec("pgd", steps=2.5),
       "attack.steps must be an integer > 0, got 2.5"),
  ]
  for build, message in cases:
    with pytest.raises(ConfigError) as error:
      build()
    assert one_line(error) == message


_FOUR_DEVICES = """
import sys
import jax
import numpy as np
from adcorda_jax.attacks import driver, specs
from adcorda_jax.errors import ConfigError
from adcorda_jax.training import sharding
from tests.test_attack_driver import EPS, KEY, PGD, digits_problem, linear_logits
assert jax.device_count() == 4, jax.devices()
params, images, labels = digits_problem()
mesh = sharding.make_mesh()
try:
  driver.attack_split(PGD, linear_logits, params, images, labels, eps=EPS, batch_size=18,
                      key=KEY, mesh=mesh, batch_size_key="robustness.batch_size")
  raise SystemExit("batch 18 over 4 devices was accepted")
except ConfigError as e:
  print("ERROR:", e)
driver.attack_split(PGD, linear_logits, params, images, labels, eps=EPS, batch_size=16, key=KEY,
                    mesh=mesh, out_dir=sys.argv[1], save_adversarial=True)
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_one_and_four_devices_agree(problem, tmp_path):
  single = _attack(problem, save_adversarial=True)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert ("ERROR: robustness.batch_size=18 cannot be split over 4 devices; use a multiple of 4"
          in out.stdout)
  with np.load(tmp_path / driver.ARRAYS_FILE) as four:
    for name, array in _arrays(single).items():
      if array.dtype.kind == "f":
        np.testing.assert_allclose(four[name], array, atol=1e-5, err_msg=name)
      else:
        np.testing.assert_array_equal(four[name], array, err_msg=name)

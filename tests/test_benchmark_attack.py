"""`task=benchmark_attack`: records, FLOP accounting, resume, errors; per-program XLA options."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adcorda_jax.attacks import benchmark
from adcorda_jax.attacks import compile as attack_compile
from adcorda_jax.errors import ConfigError
from adcorda_jax.native import build as native_build
from adcorda_jax.tasks import benchmark_attack
from configs import benchmark_attack as benchmark_config
from tests.helpers import one_line

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("model", "batch", "devices", "img_steps_per_second", "compile_seconds",
            "flops_per_img_step", "peak_gflops", "fraction_of_peak")


def _config(**overrides):
  config = benchmark_config.get_config()
  config.benchmark.cases = "small_cnn/8x8x1/10/8"
  config.benchmark.implementations = "autodiff,adcorda"
  config.benchmark.devices = (1, 2)
  config.benchmark.steps = 2
  config.benchmark.repeats = 1
  config.benchmark.update(overrides)
  return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("benchmark")
  return workdir, benchmark_attack.run_benchmark_attack(_config(), workdir)


@pytest.mark.slow
def test_records_have_the_required_fields_and_consistent_numbers(finished):
  workdir, results = finished
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["status"] == "complete" and saved["task"] == "benchmark_attack"
  records = saved["records"]
  assert isinstance(records, list) and records == results["records"]
  assert {r["implementation"] for r in records} == {"autodiff", "adcorda"}
  for record in records:
    assert all(key in record for key in REQUIRED)
    assert record["img_steps_per_second"] > 0 and record["peak_gflops"] > 0
    expected = record["img_steps_per_second"] * record["flops_per_img_step"] / (
        record["peak_gflops"] * 1e9)
    assert record["fraction_of_peak"] == pytest.approx(expected)
  # Both implementations do the same useful work: FLOPs come from the reference program.
  assert len({r["flops_per_img_step"] for r in records}) == 1
  # Which kernel variant ran is on record (the per-CPU tuning makes it machine-dependent).
  assert {r["native_variant"] for r in records} == {native_build.native_variant()}
  report = (workdir / "report.md").read_text()
  if native_build.native_variant():
    assert f"Native kernel variant (tuned for this CPU): {native_build.native_variant()}" in report
  assert "| small_cnn | 8 | 1 | adcorda |" in report


@pytest.mark.slow
def test_finished_benchmark_is_returned_not_remeasured(finished, monkeypatch):
  workdir, results = finished
  monkeypatch.setattr(benchmark, "matmul_peak_gflops", lambda: pytest.fail("re-measured"))
  again = benchmark_attack.run_benchmark_attack(_config(), workdir)
  assert again["records"] == results["records"]


@pytest.mark.slow
def test_a_release_0_1_0_benchmark_workdir_resumes_into_the_new_results(finished, tmp_path,
                                                                      monkeypatch):
  """0.1.0 kept results.json a bare list and completion in benchmark_state.json."""
  workdir, results = finished
  old = tmp_path / "old"
  old.mkdir()
  (old / "config.json").write_text((workdir / "config.json").read_text())
  (old / "results.json").write_text(json.dumps(results["records"][:1]))  # Interrupted there.
  again = benchmark_attack.run_benchmark_attack(_config(), old)
  assert again["status"] == "complete" and len(again["records"]) == len(results["records"])
  assert again["records"][0] == results["records"][0]  # Kept, not re-measured.
  (old / "results.json").write_text(json.dumps(results["records"]))
  (old / "benchmark_state.json").write_text(json.dumps({"complete": True}))
  monkeypatch.setattr(benchmark, "matmul_peak_gflops", lambda: pytest.fail("re-measured"))
  assert benchmark_attack.run_benchmark_attack(_config(), old)["records"] == results["records"]


def test_step_flops_are_per_image_and_independent_of_batch():
  def logits_fn(w, x):
    return x.reshape(x.shape[0], -1) @ w

  w = jnp.ones((16, 3))
  flops = [benchmark.step_flops(logits_fn, w, jnp.ones((n, 4, 4, 1)), jnp.zeros(n, jnp.int32),
                                {}) for n in (4, 16)]
  assert flops[0] > 2 * 16 * 3  # At least the forward matmul of one image.
  assert flops[0] == pytest.approx(flops[1], rel=0.05)


@pytest.mark.parametrize("overrides,key", [
    ({"cases": "small_cnn/28x28/10/512"}, "benchmark.cases"),
    ({"implementations": "autodiff,fastest"}, "benchmark.implementations"),
    ({"steps": 0}, "benchmark.steps"),
    ({"eps": -1.0}, "benchmark.eps"),
    ({"devices": ()}, "benchmark.devices"),
])
def test_bad_settings_name_their_key(tmp_path, overrides, key):
  with pytest.raises(ConfigError) as error:
    benchmark_attack.run_benchmark_attack(_config(**overrides), tmp_path)
  assert key in one_line(error)


def test_cpu_attack_programs_get_their_options_and_nothing_global(monkeypatch):
  options = attack_compile.compiler_options
  attack_compile._options.cache_clear()
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv(attack_compile.OVERRIDE_ENV, raising=False)
  assert dict(options("cpu", native_convolutions=False)) == attack_compile.CPU_OPTIONS
  assert options("cpu", native_convolutions=True) == ()  # YNNPACK sees no convolution then.
  assert options("gpu") == ()
  native = attack_compile.native_conv.available()
  assert options("cpu") == options("cpu", native_convolutions=native)
  attack_compile._options.cache_clear()
  monkeypatch.setenv(attack_compile.OVERRIDE_ENV, "xla_default")
  assert options("cpu", native_convolutions=False) == ()
  attack_compile._options.cache_clear()
  monkeypatch.delenv(attack_compile.OVERRIDE_ENV)
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  assert options("cpu", native_convolutions=False) == ()  # The user's own flag wins.
  attack_compile._options.cache_clear()


def test_attack_jit_works_at_top_level_and_nested():
  @attack_compile.attack_jit(static_argnames=("power",))
  def f(x, power):
    return x ** power

  x = jnp.arange(4.0)
  np.testing.assert_array_equal(f(x, power=2), x ** 2)
  np.testing.assert_array_equal(jax.jit(lambda v: f(v, power=3))(x), x ** 3)
  np.testing.assert_array_equal(jax.vmap(lambda v: f(v, power=2))(x), x ** 2)


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_cpu_devices_splits_the_cpu(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  command = [sys.executable, str(REPO / "main.py"), "--config",
             str(REPO / "configs/benchmark_attack.py"), "--workdir", str(tmp_path),
             "--config.cpu_devices=2", "--config.benchmark.cases=small_cnn/8x8x1/10/4",
             "--config.benchmark.implementations=adcorda", "--config.benchmark.steps=1",
             "--config.benchmark.repeats=1"]
  completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=300, check=False)
  assert completed.returncode == 0, completed.stderr[-2000:]
  records = json.loads((tmp_path / "results.json").read_text())["records"]
  assert sorted(r["devices"] for r in records) == [1, 2]  # 4 is skipped: only 2 devices.


def _train_config(**overrides):
  from configs import benchmark_train as train_config
  config = train_config.get_config()
  config.benchmark.cases = "small_cnn/8x8x1/10/8"
  config.benchmark.steps = 2
  config.benchmark.repeats = 1
  config.benchmark.update(overrides)
  return config


@pytest.mark.slow
def test_train_benchmark_records_resume_and_name_bad_implementations(tmp_path, monkeypatch):
  from adcorda_jax.tasks import benchmark_train
  monkeypatch.setattr(benchmark, "matmul_peak_gflops", lambda: 100.0)  # Keep the test short.
  results = benchmark_train.run_benchmark_train(_train_config(), tmp_path)
  records = json.loads((tmp_path / "results.json").read_text())["records"]
  assert records == results["records"]
  assert {r["implementation"] for r in records} == {"plain", "adcorda"}
  for record in records:
    assert record["img_per_second"] > 0 and record["flops_per_img"] > 0
    assert record["fraction_of_peak"] == pytest.approx(
        record["img_per_second"] * record["flops_per_img"] / 100e9)
  assert len({r["flops_per_img"] for r in records}) == 1  # The plain program's useful work.
  assert "| small_cnn | 8 | adcorda |" in (tmp_path / "report.md").read_text()
  # A finished run returns its results without measuring again.
  monkeypatch.setattr(benchmark_train.benchmark, "compile_train_step",
                      lambda *a, **k: pytest.fail("measured again"))
  assert benchmark_train.run_benchmark_train(_train_config(), tmp_path) == results
  with pytest.raises(ConfigError) as error:
    benchmark_train.run_benchmark_train(_train_config(implementations="plain,fastest"),
                                        tmp_path / "other")
  assert "benchmark.implementations" in one_line(error) and "fastest" in one_line(error)

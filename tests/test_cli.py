"""The command line: one run end to end, overrides, and one-line errors instead of tracebacks."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_runs_with_overrides(tmp_path):
  out = _main("--config", "configs/tiny.py", "--workdir", str(tmp_path),
              "--config.train.epochs=1", "--config.train.learning_rate=0.1")
  assert out.returncode == 0, out.stderr[-2000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["config"]["train"]["epochs"] == 1
  assert results["config"]["train"]["learning_rate"] == 0.1
  assert results["steps"] == 8  # 256 examples / batch 32.


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_bad_name_is_one_line_error(tmp_path):
  out = _main("--config", "configs/tiny.py", "--workdir", str(tmp_path),
              "--config.model.name=vgg")
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: unknown model 'vgg' (model.name); valid names:")
  assert "Traceback" not in out.stderr


def test_default_config_is_the_adcorda_pipeline_on_embedded_digits():
  """The README's first command runs configs/default.py: AdCorDA on offline digits."""
  from configs import adcorda_digits, default
  config = default.get_config()
  assert config.task == "adcorda" and config.data.name == "digits"
  assert config.to_dict() == adcorda_digits.get_config().to_dict()


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("*.py")
                                        if p.name != "__init__.py"))
def test_every_config_builds_and_its_sections_validate(path):
  """Each shipped config (with its documented arguments) passes the checks its task runs first."""
  from adcorda_jax import tasks
  from adcorda_jax.adcorda import settings as adcorda_settings
  from adcorda_jax.evaluate import read_evaluation
  from adcorda_jax.quant.deploy import Quantization
  from adcorda_jax.models import create_model
  from adcorda_jax.compression.distillation import read_distill_settings
  from adcorda_jax.study.grid import read_study_settings
  from adcorda_jax.study.methods import read_method_settings
  from adcorda_jax.study.shift_eval import read_shift_settings
  from adcorda_jax.tasks import quantize
  module = importlib.import_module(f"configs.{path[:-3]}")
  arguments = ("8", "4", "2") if path == "adcorda_fashion_mnist_quant.py" else (None,)
  for argument in arguments:
    config = module.get_config() if argument is None else module.get_config(argument)
    assert config.task in tasks.TASKS.names()
    if config.task in ("train", "adcorda", "quantize"):
      create_model(config.model, 10, (0.5,), (0.25,))
    if config.task == "adcorda":
      settings = adcorda_settings.read_settings(config)
      assert isinstance(settings.deployment, Quantization) == (argument is not None)
      assert argument is None or settings.deployment.spec.bits == int(argument)
    if config.task == "quantize":
      quantize.read_quantize_settings(config)
      read_evaluation(config)
    if config.task == "compression_study":
      settings = read_study_settings(config)
      assert settings.cells()
      read_shift_settings(config, 3)
      read_distill_settings(config)
      read_method_settings(config, settings.methods)
      read_evaluation(config)

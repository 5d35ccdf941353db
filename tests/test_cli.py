"""The command line: one run end to end, overrides, and one-line errors instead of tracebacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_runs_with_overrides(tmp_path):
  out = _main("--config", "configs/tiny.py", "--workdir", str(tmp_path),
              "--config.train.epochs=1", "--config.train.learning_rate=0.1")
  assert out.returncode == 0, out.stderr[-2000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["config"]["train"]["epochs"] == 1
  assert results["config"]["train"]["learning_rate"] == 0.1
  assert results["steps"] == 8  # 256 examples / batch 32.


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

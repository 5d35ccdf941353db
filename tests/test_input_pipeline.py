"""Training batches: device-resident and prefetched placements give the host-sliced batches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from adcorda_jax.errors import ConfigError
from adcorda_jax.training import batches, input_pipeline, sharding, trainer
from configs import tiny

REPO = Path(__file__).resolve().parent.parent


def _split(n=37, shape=(5, 5, 1)):
  rng = np.random.default_rng(0)
  return {"image": rng.uniform(size=(n,) + shape).astype(np.float32),
          "label": rng.integers(0, 10, n).astype(np.int32)}


def _expected(split, batch_size, seed, step):
  indices = batches.train_batch_indices(len(split["label"]), batch_size, step, seed)
  return {k: v[indices] for k, v in split.items()}


@pytest.mark.parametrize("placement", ["device", "host"])
def test_batches_equal_host_slicing(placement):
  split, mesh = _split(), sharding.make_mesh()
  with input_pipeline.BatchStream(split, 8, 3, mesh,
                                  input_pipeline.InputSettings(placement)) as stream:
    assert stream.placement == placement
    # In order (prefetch hits), across epoch boundaries (37 examples, batches of 8), then out of
    # order as after a resume (prefetch misses).
    for step in list(range(12)) + [30, 2, 2, 40]:
      batch = stream(step)
      for key, expected in _expected(split, 8, 3, step).items():
        np.testing.assert_array_equal(np.asarray(batch[key]), expected)
        assert batch[key].dtype == expected.dtype
        assert batch[key].sharding.is_equivalent_to(sharding.batch_sharded(mesh), expected.ndim)


def test_auto_uses_the_memory_share():
  split, mesh = _split(), sharding.make_mesh()
  size = sum(v.nbytes for v in split.values())
  memory = input_pipeline.device_memory_bytes(mesh.devices.flat[0])
  assert memory and memory > size
  fits = input_pipeline.InputSettings("auto", device_memory_fraction=1.0)
  assert input_pipeline.resolve_placement(split, mesh, fits) == "device"
  too_small = input_pipeline.InputSettings("auto", device_memory_fraction=size / memory / 2)
  assert input_pipeline.resolve_placement(split, mesh, too_small) == "host"


def test_settings_errors_name_the_key():
  config = ml_collections.ConfigDict({"data": {"placement": "gpu"}})
  with pytest.raises(ConfigError, match="data.placement='gpu'"):
    input_pipeline.settings_from_config(config)
  config = ml_collections.ConfigDict({"data": {"device_memory_fraction": 1.5}})
  with pytest.raises(ConfigError, match="data.device_memory_fraction"):
    input_pipeline.settings_from_config(config)
  assert input_pipeline.settings_from_config(ml_collections.ConfigDict()) == \
      input_pipeline.InputSettings()


@pytest.mark.slow
def test_training_runs_equal_under_both_placements(tmp_path):
  results = {}
  for placement in ("device", "host"):
    config = tiny.get_config()
    config.data.placement = placement
    results[placement] = trainer.train_and_evaluate(config, tmp_path / placement)
  for key in ("test_accuracy", "test_loss", "train_loss"):
    assert results["device"][key] == results["host"][key], key


_FOUR_DEVICES = """
import sys
import numpy as np
from adcorda_jax.training import batches, input_pipeline, sharding
mesh = sharding.make_mesh()
assert mesh.devices.size == 4
rng = np.random.default_rng(1)
split = {"image": rng.uniform(size=(50, 3, 3, 2)).astype(np.float32),
         "label": rng.integers(0, 10, 50).astype(np.int32)}
for placement in ("device", "host"):
  with input_pipeline.BatchStream(split, 12, 5, mesh,
                                  input_pipeline.InputSettings(placement)) as stream:
    for step in range(10):
      batch = stream(step)
      indices = batches.train_batch_indices(50, 12, step, 5)
      for key in split:
        np.testing.assert_array_equal(np.asarray(batch[key]), split[key][indices])
        assert len(batch[key].sharding.device_set) == 4
print("OK")
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_batches_equal_on_four_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _FOUR_DEVICES], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]

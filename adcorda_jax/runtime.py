"""Process-level JAX set-up from the config, done once before any device is touched."""
from __future__ import annotations

import jax
import ml_collections
from absl import logging

from adcorda_jax import config_checks, distributed


def setup_jax(config: ml_collections.ConfigDict) -> None:
  """Applies `config.cpu_devices` and `config.distributed`, then logs the devices.

  `cpu_devices` > 0 splits the host CPU into that many JAX devices (`jax_num_cpu_devices`, this
  process only). Attacks then run data-parallel over them, which keeps both cores of a small
  machine busier than one device does (see `task=benchmark_attack`); 0 leaves JAX's default.

  `distributed=True` calls `jax.distributed.initialize` with `config.coordinator_address`,
  `config.num_processes` and `config.process_id` (each auto-detected when left at its default;
  see `adcorda_jax.distributed`). Every process but process 0 then logs warnings and errors
  only: process 0 reports for the run.
  """
  cpu_devices = config_checks.positive_int(config, "cpu_devices", "config", default=0,
                                           allow_zero=True)
  settings = distributed.read_settings(config)  # Checked before anything is set up.
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
    logging.info("config.cpu_devices=%d: the CPU backend runs as %d JAX devices "
                 "(jax_num_cpu_devices, this process only).", cpu_devices, cpu_devices)
  if settings is not None:
    distributed.initialize(settings)
  logging.info("JAX %s, backend %s, %d process(es), devices: %s", jax.__version__,
               jax.default_backend(), jax.process_count(), jax.devices())
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)

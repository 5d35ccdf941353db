"""Tasks selectable with `config.task`; each is `run(config, workdir) -> results dict`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import ml_collections

from adcorda_jax.registry import Registry
from adcorda_jax.tasks.adcorda import run_adcorda
from adcorda_jax.tasks.benchmark_attack import run_benchmark_attack
from adcorda_jax.tasks.benchmark_train import run_benchmark_train
from adcorda_jax.tasks.compression_study import run_compression_study
from adcorda_jax.tasks.quantize import run_quantize
from adcorda_jax.tasks.robustness import run_robustness
from adcorda_jax.tasks.sweep import run_sweep
from adcorda_jax.training.trainer import train_and_evaluate

Task = Callable[[ml_collections.ConfigDict, "str | Path"], dict[str, Any]]
TASKS: Registry[Task] = Registry("task")
TASKS.register("train")(train_and_evaluate)
TASKS.register("robustness")(run_robustness)
TASKS.register("benchmark_attack")(run_benchmark_attack)
TASKS.register("benchmark_train")(run_benchmark_train)
TASKS.register("adcorda")(run_adcorda)
TASKS.register("quantize")(run_quantize)
TASKS.register("compression_study")(run_compression_study)
TASKS.register("sweep")(run_sweep)


def run_task(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Runs the task named by `config.task` in `workdir`."""
  return TASKS.get(config.get("task", "train"), "task")(config, workdir)

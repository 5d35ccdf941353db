"""`task=benchmark_train`: train-step throughput of the plain and the library's convolution path.

    python main.py --config configs/benchmark_train.py --workdir runs/benchmark_train

For every case (model, input shape, classes, batch) compiles `training.steps.train_step` (random
data, SGD with Nesterov momentum, BatchNorm in train mode) once per implementation, times them
interleaved, and records img/s, compile seconds, XLA's FLOPs per image of the plain step and the
fraction of this machine's measured float32 matmul peak. `benchmarks/torch_train_reference.py`
measures the same models and optimizer in PyTorch. Resumes per (case, implementation) record.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import logging

from adcorda_jax import config_checks, pipeline
from adcorda_jax import workdir as workdir_lib
from adcorda_jax.attacks import benchmark as attack_benchmark
from adcorda_jax.errors import ConfigError
from adcorda_jax.models import create_model
from adcorda_jax.native.build import native_variant
from adcorda_jax.reporting.benchmark_report import train_benchmark_markdown
from adcorda_jax.tasks.benchmark_attack import Case, parse_cases, parse_names, saved_records
from adcorda_jax.training import benchmark

_PREFIX = "benchmark"


def _measure_case(case: Case, section: ml_collections.ConfigDict, peak: float,
                  implementations: tuple[str, ...], seed: int) -> list[dict[str, Any]]:
  model = create_model(ml_collections.ConfigDict({"name": case.model}), case.num_classes,
                       (0.5,), (0.25,))
  flops = benchmark.step_flops(model, case.shape, case.num_classes, case.batch)
  compiled = [benchmark.compile_train_step(model, case.shape, case.num_classes, case.batch,
                                           name, section.steps, seed)
              for name in implementations]
  seconds = attack_benchmark.interleaved_seconds(compiled, section.repeats)
  records = []
  for step in compiled:
    rates = [case.batch * section.steps / s for s in seconds[step.name]]
    rate = sorted(rates)[len(rates) // 2]
    records.append({
        "model": case.model, "input_shape": list(case.shape), "num_classes": case.num_classes,
        "batch": case.batch, "backend": jax.default_backend(), "implementation": step.name,
        "img_per_second": rate, "img_per_second_min": min(rates),
        "img_per_second_max": max(rates), "compile_seconds": step.compile_seconds,
        "flops_per_img": flops, "peak_gflops": peak,
        "fraction_of_peak": rate * flops / (peak * 1e9), "steps": section.steps,
        "repeats": section.repeats, "seconds_per_run": seconds[step.name],
        "native_variant": native_variant()})
    logging.info("%s %s: %.0f img/s (%.0f%% of peak), compile %.1f s", case.label, step.name,
                 rate, 100 * records[-1]["fraction_of_peak"], step.compile_seconds)
  return records


def run_benchmark_train(config: ml_collections.ConfigDict, workdir: str | Path
                        ) -> dict[str, Any]:
  """Runs every case; `results.json` holds `records` as they finish (status `running`) and the
  envelope once all are measured."""
  section = config.get(_PREFIX)
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError("config has no 'benchmark' section; start from configs/benchmark_train.py")
  cases = parse_cases(section.cases)
  implementations = parse_names(section.implementations, "benchmark.implementations",
                                tuple(benchmark.IMPLEMENTATIONS))
  for key in ("steps", "repeats"):
    config_checks.positive_int(section, key, _PREFIX)
  with pipeline.open_run(workdir, config, task=config.get("task", "benchmark_train")) as run:
    if run.finished is not None:
      logging.info("Benchmark in %s already finished; delete the workdir to measure again.",
                   run.path)
      return run.finished
    run.claim()
    records, _ = saved_records(run.path)
    done = {(r["model"], tuple(r["input_shape"]), r["num_classes"], r["batch"],
             r["implementation"]) for r in records}
    peak = attack_benchmark.matmul_peak_gflops()
    logging.info("float32 matmul peak: %.0f GFLOP/s on %s", peak, jax.default_backend())
    for case in cases:
      wanted = tuple(name for name in implementations
                     if (case.model, case.shape, case.num_classes, case.batch, name) not in done)
      if wanted:
        records += _measure_case(case, section, peak, wanted, config.seed)
        workdir_lib.write_json_atomic(run.path / workdir_lib.RESULTS_FILE, {
            "status": "running", "task": run.task, "records": records})
    results = run.results(records=records)
    return run.finish(results, report=train_benchmark_markdown(records),
                      summary=f"{len(records)} train-step records")

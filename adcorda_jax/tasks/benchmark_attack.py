"""`task=benchmark_attack`: attack throughput of each implementation, model and device count.

    python main.py --config configs/benchmark_attack.py --workdir runs/benchmark

For every case (model, input shape, classes, batch) and device count, compiles 10-step L-inf PGD
(eps 8/255, step 2/255, random start, all steps taken) once per implementation, times them
interleaved, and records img*step/s, compile seconds, the per-image FLOPs of one step (XLA cost
analysis of the plain autodiff program, i.e. the useful work) and the fraction of this machine's
measured float32 matmul peak. Models are randomly initialized: weights do not change the cost.
Several CPU "devices" need `XLA_FLAGS=--xla_force_host_platform_device_count=N` set by the user.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from adcorda_jax import config_checks, pipeline
from adcorda_jax import workdir as workdir_lib
from adcorda_jax.attacks import benchmark
from adcorda_jax.attacks.model_fn import attack_model
from adcorda_jax.errors import ConfigError
from adcorda_jax.models import create_model
from adcorda_jax.models.frozen import frozen_logits_fn
from adcorda_jax.native.build import native_variant
from adcorda_jax.reporting.benchmark_report import benchmark_markdown

_PREFIX = "benchmark"
_CASE = re.compile(r"^(\w+)/(\d+)x(\d+)x(\d+)/(\d+)/(\d+)$")
# Release 0.1.0 kept results.json a bare list of records and marked completion here.
LEGACY_STATE_FILE = "benchmark_state.json"


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked workload: model name, input HxWxC, classes, global batch."""
  model: str
  shape: tuple[int, int, int]
  num_classes: int
  batch: int

  @property
  def label(self) -> str:
    height, width, channels = self.shape
    return f"{self.model}/{height}x{width}x{channels}/{self.num_classes}/{self.batch}"


def parse_cases(value: Any) -> tuple[Case, ...]:
  """'small_cnn/28x28x1/10/512,resnet20/32x32x3/100/256' -> Cases (one-line errors)."""
  cases = []
  for item in str(value).split(","):
    match = _CASE.match(item.strip())
    if not match:
      raise ConfigError(f"benchmark.cases entry {item.strip()!r} is not "
                        "'model/HxWxC/classes/batch', e.g. 'resnet20/32x32x3/100/256'")
    name, height, width, channels, classes, batch = match.groups()
    cases.append(Case(name, (int(height), int(width), int(channels)), int(classes), int(batch)))
  return tuple(cases)


def parse_names(value: Any, key: str, valid: tuple[str, ...]) -> tuple[str, ...]:
  """A comma-separated list of names from `valid` (one-line error naming `key`)."""
  names = tuple(name.strip() for name in str(value).split(",") if name.strip())
  unknown = [name for name in names if name not in valid]
  if not names or unknown:
    raise ConfigError(f"{key}={value!r} has unknown entries {unknown}; valid: {', '.join(valid)}")
  return names


def _device_counts(value: Any) -> tuple[int, ...]:
  counts = tuple(sorted({int(v) for v in value})) if value else ()
  if not counts or counts[0] < 1:
    raise ConfigError(f"benchmark.devices={value!r} must be a non-empty list of integers >= 1")
  available = jax.device_count()
  usable = tuple(c for c in counts if c <= available)
  if len(usable) < len(counts):
    logging.warning("benchmark.devices: %s exceed the %d available device(s) and are skipped "
                    "(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N).",
                    [c for c in counts if c > available], available)
  return usable or (1,)


def _model_and_inputs(case: Case, seed: int):
  model_config = ml_collections.ConfigDict({"name": case.model, "width": 1.0, "dropout": 0.0})
  model = create_model(model_config, case.num_classes, (0.5,), (0.25,))
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (case.batch,) + case.shape).astype(np.float32)
  labels = rng.integers(0, case.num_classes, case.batch).astype(np.int32)
  variables = model.init(jax.random.key(seed), x[:1])
  return model, variables, x, labels


def _measure_case(case: Case, devices: int, section, peak: float,
                  implementations: tuple[str, ...], seed: int) -> list[dict[str, Any]]:
  """Records for one case on `devices` devices, implementations timed interleaved."""
  if case.batch % devices:
    logging.warning("Skipping %s on %d devices: batch not divisible.", case.label, devices)
    return []
  model, variables, x, labels = _model_and_inputs(case, seed)
  backend = jax.default_backend()
  # On one device: XLA's cost analysis of a sharded program counts one device's share.
  flops = benchmark.step_flops(frozen_logits_fn(model, False), variables, x, labels, {})
  params, x, labels = benchmark.place(benchmark.sub_mesh(devices), variables, x, labels)
  # CPU "devices" share the cores the single-device matmul already used; accelerators add up.
  peak = peak if backend == "cpu" else peak * devices
  compiled = []
  for name in implementations:
    implementation = benchmark.IMPLEMENTATIONS[name]
    if name == "adcorda":  # What every attack of the library runs on this backend.
      logits_fn, _ = attack_model(model, variables)
    else:
      logits_fn = frozen_logits_fn(model, implementation.fast_input_gradients,
                                   implementation.native_kernels, implementation.fuse_layers)
    compiled.append(benchmark.compile_pgd(
        logits_fn, params, x, labels, eps=section.eps, step_size=section.step_size,
        steps=section.steps, compiler_options=implementation.compiler_options(backend),
        name=name))
  seconds = benchmark.interleaved_seconds(compiled, section.repeats)
  records = []
  for attack in compiled:
    rates = benchmark.summarize(seconds[attack.name], case.batch, section.steps)
    records.append({
        "model": case.model, "input_shape": list(case.shape), "num_classes": case.num_classes,
        "batch": case.batch, "devices": devices, "backend": backend,
        "implementation": attack.name, **rates,
        "compile_seconds": attack.compile_seconds, "flops_per_img_step": flops,
        "peak_gflops": peak,  # Of the devices used (CPU devices share one machine's peak).
        "fraction_of_peak": rates["img_steps_per_second"] * flops / (peak * 1e9),
        "steps": section.steps, "repeats": section.repeats,
        "seconds_per_run": seconds[attack.name], "native_variant": native_variant()})
    logging.info("%s devices=%d %s: %.0f img*step/s (%.0f%% of peak), compile %.1f s",
                 case.label, devices, attack.name, rates["img_steps_per_second"],
                 100 * records[-1]["fraction_of_peak"], attack.compile_seconds)
  return records


def _key(record: dict[str, Any]) -> tuple:
  return (record["model"], tuple(record["input_shape"]), record["num_classes"], record["batch"],
          record["devices"], record["implementation"])


def run_benchmark_attack(config: ml_collections.ConfigDict,
                         workdir: str | Path) -> dict[str, Any]:
  """Runs the benchmark grid; `results.json` holds `records` as they finish (status `running`)
  and the envelope once every case is measured (status `complete`)."""
  section = config.get(_PREFIX)
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError("config has no 'benchmark' section; start from configs/benchmark_attack.py")
  cases = parse_cases(section.cases)
  implementations = parse_names(section.implementations, "benchmark.implementations",
                           tuple(benchmark.IMPLEMENTATIONS))
  for key in ("steps", "repeats"):
    config_checks.positive_int(section, key, _PREFIX)
  for key in ("eps", "step_size"):
    config_checks.positive_float(section, key, _PREFIX)
  device_counts = _device_counts(section.devices)
  with pipeline.open_run(workdir, config, task=config.get("task", "benchmark_attack")) as run:
    if run.finished is not None:
      logging.info("Benchmark in %s already finished; delete the workdir to measure again.",
                   run.path)
      return run.finished
    run.claim()
    return _run_grid(run, cases, implementations, device_counts, section, config.seed)


def saved_records(workdir: Path) -> tuple[list[dict[str, Any]], bool]:
  """(records measured so far, whether a release-0.1.0 run finished them all)."""
  path = workdir / workdir_lib.RESULTS_FILE
  saved = workdir_lib.read_json(path) if path.exists() else {}
  if isinstance(saved, list):  # Release 0.1.0: a bare list, completion in the state file.
    state = workdir / LEGACY_STATE_FILE
    return saved, state.exists() and bool(workdir_lib.read_json(state).get("complete"))
  return list(saved.get("records", [])), False


def _run_grid(run: pipeline.Run, cases: tuple[Case, ...], implementations: tuple[str, ...],
              device_counts: tuple[int, ...], section: ml_collections.ConfigDict, seed: int
              ) -> dict[str, Any]:
  """Measures every (case, device count, implementation) not yet in results.json."""
  workdir = run.path
  results_path = workdir / workdir_lib.RESULTS_FILE
  records, legacy_complete = saved_records(workdir)
  done = {_key(r) for r in records}
  if not legacy_complete:
    peak = benchmark.matmul_peak_gflops()
    logging.info("float32 matmul peak: %.0f GFLOP/s on %s", peak, jax.default_backend())
    for case in cases:
      for devices in device_counts:
        wanted = tuple(name for name in implementations
                       if (case.model, case.shape, case.num_classes, case.batch, devices, name)
                       not in done)
        if wanted:
          records += _measure_case(case, devices, section, peak, wanted, seed)
          workdir_lib.write_json_atomic(results_path, {
              "status": "running", "task": run.task, "records": records})
  results = run.results(records=records)  # Each: model, shape, devices, implementation, rates.
  return run.finish(results, report=benchmark_markdown(records),
                    summary=f"{len(records)} benchmark records")

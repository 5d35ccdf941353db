"""`task=sweep`: run any config over axes of overrides, then tabulate, compare and plot the cells.

    python main.py --config configs/sweep_adcorda_digits.py --workdir runs/map_digits
    python main.py --config configs/sweep_adcorda_digits.py --workdir runs/map_digits \
        --config.sweep.mode=commands      # commands.txt + SLURM array scripts instead
    python main.py --config runs/map_digits/configs/sweep.py --workdir runs/map_digits
                                          # (mode=collect) aggregates whatever cells exist

`config.base` is the cells' config and `config.sweep` the axes (`sweep.cells`, built with
`adcorda_jax.sweep.axes`, times `sweep.seeds`). Every cell is an ordinary run of the base task in
`cells/<name>/`, so it resumes, is cached and refuses a changed config like a single run. With
`sweep.share_baseline` (task=adcorda) cells that train the same baseline load one, trained once in
`baselines/<name>/`. Modes:

* `run`: the jobs run here one after another (finished ones are skipped, and so are shared
  baselines that no unfinished cell needs), with a progress line and ETA over the whole sweep,
  then `collect`.
* `commands`: writes `configs/` (one config file per job), `commands.txt` (one `main.py` command
  per job, baselines first), `baseline_commands.txt` + `cell_commands.txt`, `slurm_array.sh` and
  `submit_slurm.sh` (a baseline array, then the cell array after it), and `configs/sweep.py`, the
  collect command's config. Nothing runs.
* `collect`: aggregates the finished cells (`sweep.aggregate`) into results.json, report.md and
  one map plot per metric; missing or stale cells are listed, not guessed.

A finished cell is its `cells/<name>/results.json` (status complete, and the config it records
equal to the cell's but for the path of its shared baseline's folder): copied alone into another
sweep workdir, it counts as done there for both `run` and `collect` (and its baseline is not
trained again), so a map can be finished piecewise on several machines.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ml_collections
import tqdm
from absl import logging

import adcorda_jax
from adcorda_jax import pipeline
from adcorda_jax import workdir as workdir_lib
from adcorda_jax.adcorda.settings import read_settings as read_adcorda_settings
from adcorda_jax.errors import AdcordaError, ConfigError
from adcorda_jax.pipeline import fingerprint
from adcorda_jax.reporting import sweep_report
from adcorda_jax.sweep import aggregate, plan as plan_lib

# Tasks whose every setting a sweep checks for all cells before the first one runs.
SETTINGS_CHECKS: dict[str, Callable[[ml_collections.ConfigDict], Any]] = {
    "adcorda": read_adcorda_settings}
JobCallback = Callable[[plan_lib.Job], None]


def run_sweep(config: ml_collections.ConfigDict, workdir: str | Path, *,
              job_callback: JobCallback | None = None) -> dict[str, Any]:
  """Runs, writes the commands of, or collects the sweep in `config` (see the module doc)."""
  workdir = Path(workdir).expanduser().absolute()
  plan = plan_lib.make_plan(config, workdir)
  check = SETTINGS_CHECKS.get(plan.base.task)
  if check is not None and plan.settings.mode != "collect":
    for job in plan.cells:
      try:
        check(job.config)
      except ConfigError as e:
        raise ConfigError(f"sweep cell {job.name!r}: {e}") from None
  with pipeline.open_run(workdir, config, task="sweep", strict=False) as run:
    run.claim()
    write_configs(plan, config, workdir)
    if plan.settings.mode == "commands":
      return write_commands(plan, workdir)
    failures = run_jobs(plan, job_callback) if plan.settings.mode == "run" else {}
    results = collect(run, plan, failures)
  if failures:
    raise AdcordaError(f"{len(failures)} of {len(plan.jobs)} sweep runs failed "
                       f"({', '.join(list(failures)[:3])}{' ...' if len(failures) > 3 else ''}); "
                       f"the others are in {str(workdir / workdir_lib.RESULTS_FILE)!r}; rerun the "
                       "same command to retry them")
  return results


def write_configs(plan: plan_lib.Plan, config: ml_collections.ConfigDict, workdir: Path) -> None:
  """Every job's config file, and `configs/sweep.py`: this sweep in collect mode."""
  for job in plan.jobs:
    workdir_lib.makedirs(job.config_path.parent)
    workdir_lib.write_text_atomic(job.config_path, plan_lib.config_file_text(
        job.config_text, f"Sweep job {job.name!r} of {str(workdir)!r}."))
  collect_config = ml_collections.ConfigDict(config.to_dict())
  collect_config.sweep.mode = "collect"
  workdir_lib.write_text_atomic(workdir / "configs" / "sweep.py", plan_lib.config_file_text(
      plan_lib.python_literal(collect_config.to_dict(), "config"),
      f"The sweep of {str(workdir)!r} in collect mode."))


def job_command(job: plan_lib.Job, command: str) -> str:
  """The shell command that runs `job` (`sweep.command` with its fields filled, quoted)."""
  main = Path(adcorda_jax.__file__).resolve().parent.parent / "main.py"
  return command.format(python=shlex.quote(sys.executable),
                        main=shlex.quote(str(main) if main.exists() else "main.py"),
                        config=shlex.quote(str(job.config_path)),
                        workdir=shlex.quote(str(job.workdir)))


def write_commands(plan: plan_lib.Plan, workdir: Path) -> dict[str, Any]:
  """`commands.txt` and the SLURM scripts; returns what was written (no results.json)."""
  command = plan.settings.command
  lines = {name: [job_command(job, command) for job in jobs]
           for name, jobs in (("baseline", plan.baselines), ("cell", plan.cells))}
  write = workdir_lib.write_text_atomic
  every = lines["baseline"] + lines["cell"]
  write(workdir / "commands.txt", "".join(f"{line}\n" for line in every))
  for name, group in lines.items():
    write(workdir / f"{name}_commands.txt", "".join(f"{line}\n" for line in group))
  write(workdir / "slurm_array.sh", SLURM_ARRAY.format(workdir=shlex.quote(str(workdir))))
  cells = f"sbatch --parsable --array=1-{len(plan.cells)} slurm_array.sh cell_commands.txt"
  submit = cells
  if plan.baselines:
    after = cells.replace("--parsable", "--dependency=afterok:$baselines")
    submit = (f"baselines=$(sbatch --parsable --array=1-{len(plan.baselines)} slurm_array.sh "
              f"baseline_commands.txt)\n{after}")
  collect_line = job_command(plan_lib.Job("sweep", {}, "", workdir, workdir / "configs" /
                                          "sweep.py"), command)
  write(workdir / "submit_slurm.sh", SUBMIT.format(workdir=shlex.quote(str(workdir)),
                                                   submit=submit, collect=collect_line))
  logging.info("Wrote %d commands (%d shared baselines first) to %s; SLURM: bash %s; then "
               "collect: %s", len(plan.jobs), len(plan.baselines), workdir / "commands.txt",
               workdir / "submit_slurm.sh", collect_line)
  return {"status": "commands", "task": "sweep", "commands": every, "collect": collect_line}


SLURM_ARRAY = """#!/usr/bin/env bash
# One sweep job per array task: sbatch --array=1-N slurm_array.sh <commands file>.
# Line SLURM_ARRAY_TASK_ID of the file is the job; each is an ordinary, resumable run.
#SBATCH --job-name=adcorda-sweep
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
cd {workdir}
line=$(sed -n "${{SLURM_ARRAY_TASK_ID}}p" "$1")
[ -n "$line" ] || {{ echo "no line $SLURM_ARRAY_TASK_ID in $1" >&2; exit 1; }}
eval "$line"
"""

SUBMIT = """#!/usr/bin/env bash
# Submits the sweep to SLURM: the shared baselines, then the cells once they all succeeded.
set -euo pipefail
cd {workdir}
{submit}
echo "when the arrays finish: {collect}"
"""


def _finished(job: plan_lib.Job) -> dict[str, Any] | None:
  """The job's saved results if it finished with exactly its current config, else None."""
  results = pipeline.finished_results(job.workdir) if job.workdir.is_dir() else None
  if results is None:
    return None
  current = workdir_lib.config_to_dict(job.config)
  ignore = set(fingerprint.RESUMABLE_KEYS)
  shared_key = plan_lib.SHARED_BASELINE_KEYS.get(job.config.get("task"))
  if job.baseline is not None and shared_key:
    # The shared baseline's folder, wherever the sweep workdir was: its name stands for its
    # config (data, model, train, seed), which the rest of the comparison covers.
    recorded = fingerprint.flatten(results.get("config", {})).get(shared_key)
    if isinstance(recorded, str) and Path(recorded).parts[-2:] == ("baselines", job.baseline):
      ignore.add(shared_key)
  if fingerprint.differences(results.get("config", {}), current, ignore):
    return None
  return results


def progress_line(done: int, total: int, computed: list[float], started: float,
                  last: str) -> str:
  """`sweep: 3/20 runs (15%), 0:04:10 so far, ETA 0:23:30; last: <name> 78 s`."""
  elapsed = time.perf_counter() - started
  eta = (total - done) * sum(computed) / len(computed) if computed else float("nan")
  eta_text = tqdm.tqdm.format_interval(eta) if eta == eta else "?"
  return (f"sweep: {done}/{total} runs ({100 * done / max(total, 1):.0f}%), "
          f"{tqdm.tqdm.format_interval(elapsed)} so far, ETA {eta_text}; last: {last}")


def run_jobs(plan: plan_lib.Plan, job_callback: JobCallback | None) -> dict[str, str]:
  """Runs every unfinished job here, shared baselines first; returns {failed job: error}."""
  from adcorda_jax import tasks  # pylint: disable=import-outside-toplevel  (tasks imports this)
  failures: dict[str, str] = {}
  started, computed = time.perf_counter(), []
  jobs = plan.jobs
  done_before = {job.label for job in jobs if _finished(job) is not None}
  # A shared baseline is only needed by cells still to run: cells finished elsewhere (their
  # results.json copied into cells/) do not make this machine train their baseline again.
  needed = {f"baselines/{job.baseline}" for job in plan.cells
            if job.baseline is not None and job.label not in done_before}
  unneeded = {job.label for job in plan.baselines} - needed - done_before
  if done_before or unneeded:
    logging.info("sweep: %d of %d runs finished earlier (loaded, not rerun), %d baselines not "
                 "needed by any unfinished cell; %d to run", len(done_before), len(jobs),
                 len(unneeded), len(jobs) - len(done_before) - len(unneeded))
  done_before |= unneeded
  for index, job in enumerate(jobs, 1):
    if job.baseline is not None and f"baselines/{job.baseline}" in failures:
      failures[job.label] = f"its baseline {job.baseline!r} failed"
      continue
    if job.label in done_before:
      continue
    if job_callback is not None:
      job_callback(job)
    logging.info("Sweep run %d/%d: %s", index, len(jobs), job.workdir)
    job_started = time.perf_counter()
    try:
      tasks.run_task(job.config.copy_and_resolve_references(), job.workdir)  # Tasks own theirs.
    except AdcordaError as e:
      if plan.settings.on_error == "stop":
        raise type(e)(f"sweep run {job.label!r}: {e}") from None
      failures[job.label] = str(e)
      logging.error("Sweep run %s failed (sweep.on_error=continue): %s", job.label, e)
    computed.append(time.perf_counter() - job_started)
    logging.info("%s", progress_line(index, len(jobs), computed, started,
                                    f"{job.label} {computed[-1]:.0f} s"))
  return failures


def _status(job: plan_lib.Job, results: dict[str, Any] | None, failures: dict[str, str]) -> str:
  if results is not None:
    return "complete"
  if job.label in failures:
    return f"failed: {failures[job.label]}"
  if pipeline.finished_results(job.workdir) is not None:
    return "stale"  # Finished with another config: rerun the sweep to redo it.
  return "missing"


def collect(run: pipeline.Run, plan: plan_lib.Plan, failures: dict[str, str]) -> dict[str, Any]:
  """Aggregates the finished cells into results.json, report.md and the map plots."""
  settings = plan.settings
  axis_keys = [k for k in settings.axis_keys if k != settings.seed_key]
  groups: dict[str, aggregate.Group] = {}
  cells, wall = [], 0.0
  for job in plan.jobs:
    results = _finished(job)
    status = _status(job, results, failures)
    seconds = float(results.get("wall_seconds", 0.0)) if results else None
    wall += seconds or 0.0
    kind = "cell" if job.label.startswith("cells/") else "baseline"
    cells.append({"name": job.name, "kind": kind,
                  "overrides": job.overrides, "workdir": str(job.workdir), "status": status,
                  "wall_seconds": seconds, "baseline": job.baseline})
    if results is None or kind != "cell":
      continue
    key = {k: v for k, v in job.overrides.items() if k != settings.seed_key}
    cell_config = job.config
    group = groups.setdefault(plan_lib.axes.cell_key(key), aggregate.Group(
        name=plan_lib.axes.cell_name(key, settings.axis_keys), overrides=key,
        axis_values={k: plan_lib.effective_value(cell_config, k) for k in axis_keys}))
    group.cells.append(job.name)
    group.add(job.overrides.get(settings.seed_key), aggregate.cell_rows(results))
  tables = aggregate.aggregate_groups(list(groups.values()), settings.comparisons,
                                      settings.metrics)
  complete = sum(c["status"] == "complete" for c in cells if c["kind"] == "cell")
  results = run.results(
      base_task=plan.base.task, axes=axis_keys, seed_key=settings.seed_key,
      cells_total=len(plan.cells), cells_complete=complete,
      runs_wall_seconds=wall, cells=cells, **tables)
  plots = sweep_report.map_plots(results, run.path)
  return run.finish(results, report=sweep_report.sweep_markdown(results),
                    summary=f"{complete}/{len(plan.cells)} cells aggregated",
                    plots=plots)

"""`task=compression_study`: how compression changes robustness (arXiv 2401.12014), on any data.

    python main.py --config configs/compression_fashion_mnist.py --workdir runs/study_fm

1. Each network of `study.networks` is trained (`train` recipe) in `networks/<label>/`.
2. Each cell (network x method x rate x seed, `study.grid`) is compressed and fine-tuned
   (`study.compress`) in `cells/<label>/<method>_<rate>/seed<k>/`, then evaluated: clean test
   accuracy, accuracy under every corruption and severity and on other domains (`shift`), and
   robust accuracy under `evaluate`'s attacks. A finished cell writes `done.json` and is never
   recomputed; an interrupted one resumes from its checkpoints; a config change that would
   change a cell is refused with the keys that differ.
3. Seeds are averaged per (network, method, rate); the four findings are decided on relative
   robustness to shift and, separately, to the strongest attack (`study.findings`);
   `results.json`, `report.md` and plots are written.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TypedDict

import jax
import ml_collections
import numpy as np
from absl import logging

from adcorda_jax import pipeline
from adcorda_jax import workdir as workdir_lib
from adcorda_jax.training.finetune import ALIGNMENT_KEYS
from adcorda_jax.compression import size_bytes
from adcorda_jax.data import Dataset, load_dataset
from adcorda_jax.progress import Progress
from adcorda_jax.reporting import study_report
from adcorda_jax.shift import save_preview_grid
from adcorda_jax.study import findings as findings_lib
from adcorda_jax.study.compress import Compressed, Compressor, network_stats
from adcorda_jax.study.grid import Cell, Network, StudySettings, read_study_settings
from adcorda_jax.study.methods import COMPRESSION_METHODS, read_method_settings
from adcorda_jax.study.shift_eval import (ShiftedSets, build_shifted_sets, read_shift_settings,
                                          shift_accuracy)
from adcorda_jax.evaluate import EvaluationSettings, Evaluator, aggregate, read_evaluation
from adcorda_jax.evaluate import make_predictor
from adcorda_jax.pipeline.fingerprint import config_keys, tree_digest
from adcorda_jax.training import checkpointing, finetune, input_pipeline, sharding
from adcorda_jax.training.baseline import ensure_baseline


class StudyResults(TypedDict):
  """`results.json` of task=compression_study (besides the envelope: status, task, config...)."""
  dataset: str
  seeds: list[int]
  networks: dict[str, dict[str, Any]]  # label -> the original network's seed-averaged results.
  cells: list[dict[str, Any]]          # One per (network, method, rate), seed-averaged.
  findings: list[dict[str, Any]]       # The paper's four findings, decided with evidence.
  shift: dict[str, Any]
  evaluate: dict[str, Any]
  preview: str | None


class _Study:
  """Shared state of one run: data, shifted sets, evaluation settings, the mesh."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: Path, settings: StudySettings,
               dataset: Dataset, sets: ShiftedSets, evaluation: EvaluationSettings,
               mesh: jax.sharding.Mesh):
    self.config, self.workdir, self.settings = config, workdir, settings
    self.dataset, self.sets, self.evaluation, self.mesh = dataset, sets, evaluation, mesh
    self.key = jax.random.key(config.get("seed", 0))
    self.shift_keys = config_keys(config, ("shift",))
    self.evaluate_keys = config_keys(config, ("evaluate",))

  def evaluate(self, model: Any, variables: dict[str, Any], directory: Path,
               fingerprint: dict[str, Any], label: str) -> dict[str, Any]:
    """Clean, shifted and robust accuracy of one network (cached in `directory`)."""
    predict = make_predictor(model.apply, self.evaluation.batch_size, self.mesh)
    evaluator = Evaluator.of(self.evaluation, self.dataset, model,
                             jax.random.fold_in(self.key, 2), self.mesh, predict=predict,
                             splits=("test",), retired_keys=ALIGNMENT_KEYS)
    outputs = evaluator(variables, directory / "evaluate", {**fingerprint, **self.evaluate_keys},
                        label)
    stage = pipeline.Stage(directory / "shift", "shift", {
        **fingerprint, **self.shift_keys, "evaluate.params_sha1": tree_digest(variables)},
        ALIGNMENT_KEYS).claim()
    shift = stage.done()
    if shift is None:
      shift = stage.finish(shift_accuracy(predict, variables, self.sets))
    return {**outputs, "shift": shift}


def _train_network(study: _Study, network: Network) -> tuple[Path, dict[str, Any]]:
  config = ml_collections.ConfigDict(study.config.to_dict())
  config.model = ml_collections.ConfigDict(network.model_config(study.config.model.to_dict()))
  directory = study.workdir / "networks" / network.label
  return ensure_baseline(config, None, "study.network", directory)


def _summarize(entries: list[dict[str, Any]], stats: dict[str, Any],
               original_bytes: int) -> dict[str, Any]:
  """Seed-averaged evaluation of one network or cell, with its size and relative robustness."""
  summary = aggregate(entries)
  shifts = [e["shift"] for e in entries]
  corruption = [s["corruption_mean"] for s in shifts if s["corruption_mean"] is not None]
  summary["shift"] = {
      "corruption_mean": float(np.mean(corruption)) if corruption else None,
      "corruption_mean_std": float(np.std(corruption, ddof=1)) if len(corruption) > 1 else 0.0,
      "per_corruption": {name: float(np.mean([s["per_corruption"][name] for s in shifts]))
                         for name in shifts[0]["per_corruption"]},
      "domains": {name: float(np.mean([s["domains"][name] for s in shifts]))
                  for name in shifts[0]["domains"]},
      "corrupted_examples": shifts[0]["corrupted_examples"],
  }
  summary.update(stats)
  summary["compression_ratio"] = original_bytes / stats["size_bytes"]
  summary["relative_robustness"] = findings_lib.relative_robustness(summary)
  per_seed = [findings_lib.relative_robustness(entry) for entry in entries]
  summary["relative_robustness_std"] = (float(np.std(per_seed, ddof=1)) if len(per_seed) > 1
                                        else 0.0)
  summary["relative_robust_accuracy"] = {
      attack: {eps: value / max(summary["test_accuracy"], 1e-12) for eps, value in by_eps.items()}
      for attack, by_eps in summary["robust_accuracy"].items()}
  return summary


def _run_cell(study: _Study, compressor: Compressor, cell: Cell, original: dict[str, Any]
              ) -> tuple[dict[str, Any], bool]:
  """Compresses, fine-tunes and evaluates one cell, or loads its finished result.

  Returns the result and whether it came from the cache.
  """
  directory = study.workdir / "cells" / cell.path
  method = COMPRESSION_METHODS.get(cell.method)
  fingerprint = {**original["fingerprint"], **method.cell_fingerprint(
      study.config, cell, compressor.method_settings[cell.method])}
  stage = pipeline.Stage(directory, "cell", {**fingerprint, **study.shift_keys,
                                             **study.evaluate_keys}, ALIGNMENT_KEYS).claim()
  done = stage.done()
  if done is not None:
    return done, True
  logging.info("Cell %s: compressing.", cell.path)
  start = time.perf_counter()
  compressed: Compressed = compressor(cell, original["model_config"], original["model"],
                                      original["variables"], original["meta"], directory)
  stats = {**network_stats(compressed.model, compressed.variables, study.dataset.image_shape),
           "size_bytes": int(compressed.size_bytes), "details": compressed.details}
  evaluation = study.evaluate(compressed.model, compressed.variables, directory, fingerprint,
                              cell.path)
  # Seconds of this attempt (a resumed cell counts only its last attempt).
  result = {"seed": cell.seed, **evaluation, **stats, "seconds": time.perf_counter() - start}
  return stage.finish(result), False


def _original(study: _Study, network: Network) -> dict[str, Any]:
  """One original network: trained (or loaded) in `networks/<label>`, evaluated, measured."""
  checkpoint, fingerprint = _train_network(study, network)
  variables, meta = checkpointing.load_checkpoint(checkpoint)
  model = checkpointing.model_from_meta(meta)
  fingerprint["network.params_sha1"] = tree_digest(variables)
  evaluation = study.evaluate(model, variables, checkpoint, fingerprint, network.label)
  stats = {**network_stats(model, variables, study.dataset.image_shape),
           "size_bytes": int(size_bytes(variables["params"]))}
  return {"model": model, "variables": variables, "meta": meta, "model_config": meta["model"],
          "fingerprint": fingerprint, "evaluation": evaluation, "stats": stats}


def _run_grid(study: _Study, compressor: Compressor, originals: dict[str, dict[str, Any]]
              ) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
  """Every cell of the grid, computed or loaded: (network, method, rate) -> per-seed results."""
  by_group: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
  grid = study.settings.cells()
  progress = Progress(len(grid), "study", unit="cell")
  for cell in grid:
    result, cached = _run_cell(study, compressor, cell, originals[cell.network.label])
    by_group.setdefault((cell.network.label, cell.method, cell.rate), []).append(result)
    if cached:
      progress.skip(1)
    else:
      progress.update(1, clean=result["test_accuracy"])
  progress.close()
  return by_group


def run_compression_study(config: ml_collections.ConfigDict, workdir: str | Path
                          ) -> dict[str, Any]:
  """Runs (or resumes) the whole grid in `workdir`; returns (and saves) the results."""
  with pipeline.open_run(workdir, config, task=config.get("task", "compression_study"),
                         strict=False) as run:
    if run.finished is not None:
      return run.finished
    return _study(config, run)


def _study(config: ml_collections.ConfigDict, run: pipeline.Run) -> dict[str, Any]:
  workdir = run.path
  settings = read_study_settings(config)
  evaluation = read_evaluation(config)
  adapt = finetune.read_finetune_settings(config)
  method_settings = read_method_settings(config, settings.methods)
  seed = config.get("seed", 0)
  dataset = load_dataset(config.data, seed)
  shift_settings = read_shift_settings(config, dataset.image_shape[2])
  mesh = sharding.make_mesh()
  sharding.check_divisible(evaluation.batch_size, "evaluate.batch_size", mesh)
  sharding.check_divisible(adapt.batch_size, "adapt.batch_size", mesh)
  run.claim()  # Every setting is checked, against the mesh too: work starts here.
  sets = build_shifted_sets(shift_settings, dataset, jax.random.fold_in(jax.random.key(seed), 3),
                            seed)
  study = _Study(config, workdir, settings, dataset, sets, evaluation, mesh)
  preview = None
  if settings.plot_corruptions and shift_settings.corruptions and workdir_lib.is_writer():
    preview = workdir / "corruptions.png"
    save_preview_grid(preview, dataset.test.images[:2], jax.random.key(seed),
                      names=list(shift_settings.corruptions))

  originals = {network.label: _original(study, network) for network in settings.networks}
  by_group = _run_grid(study, Compressor(
      dataset, adapt, method_settings, input_pipeline.settings_from_config(config)), originals)

  networks = {}
  for network in settings.networks:
    original = originals[network.label]
    networks[network.label] = {
        "name": network.name, "width": network.width,
        **_summarize([original["evaluation"]], original["stats"], original["stats"]["size_bytes"])}
  cells = []
  for (label, method, rate), entries in by_group.items():
    first = entries[0]
    stats = {key: first[key] for key in ("params", "nonzero_params", "flops", "size_bytes")}
    cell = Cell(next(n for n in settings.networks if n.label == label), method, rate, 0)
    cells.append({"network": label, "method": method, "rate": rate, "name": cell.name,
                  "details": first["details"],
                  "seconds": float(sum(entry.get("seconds", 0.0) for entry in entries)),
                  **_summarize(entries, stats, originals[label]["stats"]["size_bytes"])})
  # The adversarial verdicts use the last configured attack (the strongest, by convention) at
  # the largest eps.
  strongest = (evaluation.specs[-1].name, max(evaluation.eps)) if evaluation.eps else None
  findings = findings_lib.decide_findings(networks, cells, [n.label for n in settings.networks],
                                          adversarial=strongest)
  results = run.results(**StudyResults(
      dataset=dataset.name, seeds=list(settings.seeds), networks=networks, cells=cells,
      findings=findings,
      shift={"corruptions": list(shift_settings.corruptions),
             "severities": list(shift_settings.severities),
             "corrupted_examples": int(len(sets.corrupted_labels)),
             "domains": list(sets.domains)},
      evaluate=evaluation.summary(len(dataset.test) if evaluation.max_examples == 0
                                  else min(evaluation.max_examples, len(dataset.test))),
      preview=str(preview.name) if preview else None))
  return run.finish(
      results, report=study_report.study_markdown(results),
      summary=study_report.summary_line(results),
      plots=[lambda: study_report.plot_accuracy_vs_compression(
                 results, workdir / "accuracy_vs_compression.png"),
             lambda: study_report.plot_large_vs_small(results, workdir / "large_vs_small.png")])

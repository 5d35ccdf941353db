"""`task=quantize`: post-training quantization grid, integer export and QAT controls of one network.

    python main.py --config configs/quantize_fashion_mnist.py --workdir runs/quantize_fm

For a float checkpoint (`quantize.checkpoint`, or trained in `<workdir>/baseline`):

* `float`: the network as trained.
* `ptq_w<bits>_<granularity>` for each of `quantize.bits` x `quantize.granularities`: kernels
  calibrated by `model.quant.calibration` (BatchNorm folded first with
  `model.quant.fold_batch_norm`), exported as real integers to `exported/<name>.npz`, read back
  and evaluated: `exported_test_accuracy` must equal the fake-quantized `test_accuracy`
  (`export_matches`). With `model.quant.activation_bits` every conv/dense input is quantized too,
  on ranges calibrated from `quantize.calibration_examples` training images.
* `qat_w<bits>` for each of `quantize.qat_bits`: quantization-aware fine-tuning (fake-quantized
  kernels in the loop, straight-through gradients) with the `adapt` optimizer and budget, once per
  `quantize.seeds`; mean and std over seeds.

Every variant is evaluated like AdCorDA's (clean train/val/test, robust test accuracy under
`evaluate`), cached per folder, and reported with its true size in bytes: `results.json`
(`variants.<name>.{test_accuracy, size_bytes, ...}`), `report.md` and `accuracy_vs_bits.png`.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, TypedDict

import jax
import ml_collections
import numpy as np
from absl import logging

from adcorda_jax import config_checks
from adcorda_jax import pipeline
from adcorda_jax.training.finetune import ALIGNMENT_KEYS, without_alignment
from adcorda_jax.data import Dataset
from adcorda_jax.errors import ConfigError
from adcorda_jax.quant import calibration, export
from adcorda_jax.quant.deploy import PREFIX as QUANT_PREFIX
from adcorda_jax.quant.deploy import Quantization, quantization_from_config
from adcorda_jax.quant.fake_quant import WEIGHT_BITS, QuantSpec
from adcorda_jax.quant.quantized_model import (fake_quantize_params, quantized_apply_fn,
                                               quantized_logits_fn)
from adcorda_jax.reporting import quantize_report
from adcorda_jax.evaluate import Evaluator, aggregate, make_predictor, read_evaluation
from adcorda_jax.pipeline.fingerprint import config_keys
from adcorda_jax.training import batches, finetune, input_pipeline, sharding
from adcorda_jax.training.baseline import Baseline, load_baseline

GRANULARITIES = ("per_tensor", "per_channel")


@dataclasses.dataclass(frozen=True)
class QuantizeSettings:
  """The validated `quantize` section plus the `model.quant` template it varies."""
  checkpoint: Path | None
  bits: tuple[int, ...]
  granularities: tuple[str, ...]
  qat_bits: tuple[int, ...]
  seeds: tuple[int, ...]
  calibration_examples: int
  template: Quantization  # symmetric, calibration, BN folding, activations; bits set per cell.


class QuantizeResults(TypedDict):
  """`results.json` of task=quantize (besides the envelope: status, task, devices, config...)."""
  dataset: str
  model: str
  baseline_checkpoint: str
  data_source: str
  seeds: list[int]
  variant_order: list[str]
  variants: dict[str, dict[str, Any]]  # float, ptq_w<b>_<granularity>, qat_w<b>: see docstring.
  quantization: dict[str, Any]
  evaluate: dict[str, Any]


def _int_tuple(section: ml_collections.ConfigDict, key: str, low: int, high: int,
               allow_empty: bool) -> tuple[int, ...]:
  value = section.get(key, ())
  values = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
  if (not isinstance(values, (tuple, list)) or (not values and not allow_empty)
      or any(isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high
             for v in values) or len(set(values)) != len(values)):
    raise ConfigError(f"quantize.{key} must be a tuple of distinct integers in {low}..{high}, "
                      f"got {value!r}")
  return tuple(values)


def read_quantize_settings(config: ml_collections.ConfigDict) -> QuantizeSettings:
  """Checks `quantize` and `model.quant`; one-line ConfigErrors name the key."""
  section = config.get("quantize")
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError("config has no 'quantize' section; start from configs/quantize_digits.py")
  checkpoint = section.get("checkpoint", "")
  if not isinstance(checkpoint, str):
    raise ConfigError(f"quantize.checkpoint must be a path string ('' = train one), "
                      f"got {checkpoint!r}")
  granularities = section.get("granularities", GRANULARITIES)
  if (not isinstance(granularities, (tuple, list)) or not granularities
      or any(g not in GRANULARITIES for g in granularities)
      or len(set(granularities)) != len(granularities)):
    raise ConfigError(f"quantize.granularities must be distinct names from "
                      f"{', '.join(GRANULARITIES)}, got {granularities!r}")
  bits = _int_tuple(section, "bits", *WEIGHT_BITS, allow_empty=False)
  # The weight_bits of model.quant is replaced per cell; any valid value reads the rest.
  model_config = config.get("model").to_dict() if config.get("model") is not None else {}
  quant_config = ml_collections.ConfigDict(
      {**(model_config.get("quant") or {}), "weight_bits": bits[0]})
  template = quantization_from_config(ml_collections.ConfigDict({"quant": quant_config}))
  qat_bits = _int_tuple(section, "qat_bits", *WEIGHT_BITS, allow_empty=True)
  if qat_bits and (template.activation_spec is not None or template.fold_batch_norm):
    raise ConfigError(f"quantize.qat_bits runs weight-only QAT; set {QUANT_PREFIX}."
                      "activation_bits=0 and fold_batch_norm=False, or quantize.qat_bits=()")
  seeds = section.get("seeds", (0,))
  return QuantizeSettings(
      checkpoint=Path(checkpoint).expanduser().absolute() if checkpoint.strip() else None,
      bits=bits, granularities=tuple(granularities),
      qat_bits=qat_bits,
      seeds=_int_tuple(ml_collections.ConfigDict({"seeds": seeds}), "seeds", 0, 2**31 - 1,
                       allow_empty=False),
      calibration_examples=config_checks.positive_int(section, "calibration_examples",
                                                      "quantize", default=1024),
      template=template)


def _ptq_evaluator(evaluator: Evaluator, model: Any, quant: Quantization,
                   dataset: Dataset, examples: int, deployed: dict[str, Any]
                   ) -> Evaluator:
  """`evaluator` for the network `deployed` runs as: with quantized activations if configured."""
  if quant.activation_spec is None:
    return evaluator
  images = dataset.train.images[:examples]
  activation_scales = calibration.calibrate_activations(
      model, deployed, [images[i:i + 256] for i in range(0, len(images), 256)],
      quant.activation_spec, quant.calibration)
  apply = quantized_apply_fn(model, None, activation_scales=activation_scales,
                             activation_spec=quant.activation_spec)
  logits_fn = quantized_logits_fn(model, None, activation_scales=activation_scales,
                                  straight_through=quant.attack_gradient == "ste",
                                  activation_spec=quant.activation_spec)
  return dataclasses.replace(
      evaluator, predict=make_predictor(apply, evaluator.batch_size,
                                                         evaluator.mesh),
      attack_model_fn=lambda variables: (logits_fn, variables))


def _export_and_check(directory: Path, name: str, calibrated: dict[str, Any], scales: Any,
                      spec: QuantSpec, deployed: dict[str, Any],
                      evaluator: Evaluator, images: np.ndarray,
                      labels: np.ndarray) -> dict[str, Any]:
  """Writes the integer model, reads it back and compares it with the fake-quantized one.

  `scales` None exports on the min-max grids of the kernels (what QAT trains with).
  """
  path = directory / f"{name}.npz"
  directory.mkdir(parents=True, exist_ok=True)
  # Written every time (milliseconds): a file is never left over from other settings.
  export.save_exported(path, export.export_integer_weights(calibrated["params"], scales, spec),
                       calibrated.get("batch_stats"))
  loaded = export.load_exported(path)  # A complete model: nothing below comes from `deployed`.
  imported = {"params": export.import_integer_weights(loaded),
              "batch_stats": loaded["batch_stats"]}
  max_difference = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree.leaves(imported), jax.tree.leaves(deployed), strict=True))
  exported_prediction = evaluator.predict(imported, images)
  fake_prediction = evaluator.predict(deployed, images)
  return {"exported_path": str(path.relative_to(directory.parent)),
          "exported_file_bytes": path.stat().st_size,
          "exported_test_accuracy": float(np.mean(exported_prediction == labels)),
          "export_matches": bool(max_difference == 0.0
                                 and np.array_equal(exported_prediction, fake_prediction)),
          "export_max_weight_difference": max_difference}


def run_quantize(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Runs the float / PTQ / QAT comparison in `workdir`; returns (and saves) the results."""
  with pipeline.open_run(workdir, config, task=config.get("task", "quantize"),
                         strict=False) as run:
    if run.finished is not None:
      return run.finished
    settings = read_quantize_settings(config)
    evaluation = read_evaluation(config)
    adapt = finetune.read_finetune_settings(config) if settings.qat_bits else None
    mesh = sharding.make_mesh()
    sharding.check_divisible(evaluation.batch_size, "evaluate.batch_size", mesh)
    if adapt is not None:
      sharding.check_divisible(adapt.batch_size, "adapt.batch_size", mesh)
    run.claim()  # Every setting is checked, against the mesh too: work starts here.

    baseline = load_baseline(config, settings.checkpoint, "quantize.checkpoint", run.path)
    evaluator = Evaluator.of(evaluation, baseline.dataset, baseline.model,
                             jax.random.fold_in(jax.random.key(config.get("seed", 0)), 2), mesh,
                             retired_keys=ALIGNMENT_KEYS)
    cells = _Cells(run.path, baseline, evaluator,
                   {**baseline.fingerprint, **config_keys(config, ("evaluate",))})
    cells.float_variant()
    cells.ptq_variants(settings)
    if adapt is not None:
      cells.qat_variants(settings, adapt, without_alignment(config_keys(config, ("adapt",))),
                         input_pipeline.settings_from_config(config))
    template = settings.template
    results = run.results(**QuantizeResults(
        dataset=baseline.dataset.name, model=baseline.meta["model"]["name"],
        baseline_checkpoint=str(baseline.checkpoint), data_source=baseline.data_source,
        seeds=list(settings.seeds), variant_order=list(cells.variants), variants=cells.variants,
        quantization={"symmetric": template.spec.symmetric,
                      "calibration": template.calibration,
                      "fold_batch_norm": template.fold_batch_norm,
                      "activation_bits": (template.activation_spec.bits
                                          if template.activation_spec else 0),
                      "attack_gradient": template.attack_gradient,
                      "float_size_bytes": cells.float_bytes},
        evaluate=evaluation.summary(evaluator.robust_examples)))
    return run.finish(
        results, report=quantize_report.quantize_markdown(results),
        summary=quantize_report.summary_line(results),
        plots=[lambda: quantize_report.plot_accuracy_vs_bits(
            results, run.path / "accuracy_vs_bits.png")])


@dataclasses.dataclass
class _Cells:
  """The variants of one baseline, evaluated (and exported) into `variants` in order."""
  workdir: Path
  baseline: Baseline
  evaluator: Evaluator
  evaluate_keys: dict[str, Any]
  variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

  @functools.cached_property
  def float_bytes(self) -> int:
    return export.model_size_bytes(self.baseline.variables["params"])

  def record(self, name: str, runs: list[dict[str, Any]], **fields: Any) -> None:
    summary = aggregate(runs)
    self.variants[name] = {**summary, **fields,
                           "compression_ratio": self.float_bytes / fields["size_bytes"]}
    logging.info("%s: test accuracy %.4f, %d bytes.", name, summary["test_accuracy"],
                 fields["size_bytes"])

  def float_variant(self) -> None:
    """`float`: the network as trained."""
    self.record("float", [self.evaluator(self.baseline.variables,
                                         self.workdir / "evaluate" / "float",
                                         self.evaluate_keys, "float")],
                kind="float", bits=32, granularity=None, size_bytes=self.float_bytes)

  def ptq_variants(self, settings: QuantizeSettings) -> None:
    """`ptq_w<bits>_<granularity>`: calibrated, exported, read back and evaluated."""
    variables, model, dataset = self.baseline.variables, self.baseline.model, self.baseline.dataset
    test = dataset.test
    for bits in settings.bits:
      for granularity in settings.granularities:
        quant = settings.template.with_spec(QuantSpec(
            bits, granularity == "per_channel", settings.template.spec.symmetric))
        name = f"ptq_{quant.tag}_{granularity}"
        calibrated, scales = quant.ptq_scales(variables)
        deployed = {**calibrated, "params": fake_quantize_params(calibrated["params"], scales,
                                                                 quant.spec)}
        cell = _ptq_evaluator(self.evaluator, model, quant, dataset,
                              settings.calibration_examples, deployed)
        outputs = cell(deployed, self.workdir / "evaluate" / name,
                       {**self.evaluate_keys, **quant.fingerprint(),
                        "quantize.calibration_examples": settings.calibration_examples}, name)
        exported = _export_and_check(self.workdir / "exported", name, calibrated, scales,
                                     quant.spec, deployed, cell, test.images, test.labels)
        if not exported["export_matches"]:
          logging.warning("%s: the exported integer model differs from the fake-quantized one "
                          "(max weight difference %g).", name,
                          exported["export_max_weight_difference"])
        self.record(name, [outputs], kind="ptq", bits=bits, granularity=granularity,
                    calibration=quant.calibration,
                    size_bytes=quant.size_bytes(calibrated["params"]), **exported)

  def qat_variants(self, settings: QuantizeSettings, adapt: finetune.FinetuneSettings,
                   adapt_keys: dict[str, Any],
                   input_settings: input_pipeline.InputSettings = input_pipeline.InputSettings()
                   ) -> None:
    """`qat_w<bits>`: quantization-aware fine-tuning per seed, exported and evaluated."""
    baseline, evaluator = self.baseline, self.evaluator
    variables, model, dataset = baseline.variables, baseline.model, baseline.dataset
    params, test = variables["params"], dataset.test
    steps_per_epoch = batches.steps_per_epoch(len(dataset.train), adapt.batch_size)
    granularity = settings.template.granularity
    for bits in settings.qat_bits:
      quant = settings.template.with_spec(dataclasses.replace(settings.template.spec, bits=bits))
      runner = finetune.Finetuner(
          model, params, adapt, total_steps=adapt.epochs * steps_per_epoch,
          steps_per_epoch=steps_per_epoch, num_classes=dataset.num_classes,
          apply_fn=quant.qat_apply_fn(model), input_settings=input_settings)
      name = f"qat_{quant.tag}"
      runs = []
      for run_seed in settings.seeds:
        fingerprint = {**baseline.fingerprint, **quant.fingerprint(), **adapt_keys,
                       "adapt.seed": run_seed}
        stage = pipeline.Stage(self.workdir / "qat" / name / f"seed{run_seed}", "qat",
                               fingerprint, ALIGNMENT_KEYS).claim()
        result = runner.run(variables, (dataset.train.images, dataset.train.labels), None,
                            seed=run_seed, directory=stage.directory,
                            meta={**baseline.meta, "variant": name, "seed": run_seed},
                            description=f"{name} seed {run_seed}")
        deployed = quant.qat_variables(result.variables)
        runs.append({"seed": run_seed, **evaluator(
            deployed, self.workdir / "evaluate" / name / f"seed{run_seed}",
            {**self.evaluate_keys, **fingerprint}, f"{name} seed {run_seed}"),
            **_export_and_check(self.workdir / "exported", f"{name}_seed{run_seed}",
                                result.variables, None, quant.spec, deployed, evaluator,
                                test.images, test.labels)})
      self.record(name, runs, kind="qat", bits=bits, granularity=granularity,
                  calibration="minmax", size_bytes=quant.size_bytes(params),
                  steps=adapt.epochs * steps_per_epoch,
                  exported_test_accuracy=float(np.mean([r["exported_test_accuracy"]
                                                        for r in runs])),
                  export_matches=all(r["export_matches"] for r in runs))

"""A sweep's plan: its validated settings, and every cell as an ordinary config and workdir.

    <sweep workdir>/cells/<cell name>/       an ordinary run of the base task (resumes, caches,
                                             refuses a changed config exactly like one)
    <sweep workdir>/baselines/<name>/        with sweep.share_baseline: a task=train run that the
                                             cells with the same data/model/train/seed load
    <sweep workdir>/configs/<cell name>.py   the cell's whole config, a file main.py can run

A cell's config is the base config with the cell's overrides set; it is written out as a Python
literal and read back from that same text in every mode, so a cell run in this process and one
run from `commands.txt` on another machine see one config, and so one fingerprint.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import math
import re
from pathlib import Path
from typing import Any

import ml_collections

from adcorda_jax import config_checks
from adcorda_jax.errors import ConfigError
from adcorda_jax.pipeline import fingerprint
from adcorda_jax.sweep import axes
from adcorda_jax.training import baseline as baseline_lib

MODES = ("run", "commands", "collect")
ON_ERROR = ("stop", "continue")
# Tasks whose baseline a sweep can train once and share: the key that names a trained baseline.
SHARED_BASELINE_KEYS = {"adcorda": "adcorda.baseline_checkpoint"}
DEFAULT_METRICS = ("test_accuracy", "robust")
DEFAULT_COMMAND = "{python} {main} --config {config} --workdir {workdir}"
MAX_NAME = 150  # Longer cell names end in a digest instead.


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A paired difference `minuend - subtrahend` between two variants of the same cell."""
  minuend: str
  subtrahend: str

  @property
  def name(self) -> str:
    return f"{self.minuend} - {self.subtrahend}"


@dataclasses.dataclass(frozen=True)
class SweepSettings:
  """The validated `sweep` section."""
  mode: str
  cells: tuple[axes.Cell, ...]   # Every cell's overrides, seeds included.
  axis_keys: tuple[str, ...]     # Override keys in first-appearance order, the seed key last.
  seed_key: str
  comparisons: tuple[Comparison, ...]
  metrics: tuple[str, ...]
  share_baseline: bool
  on_error: str
  command: str
  only: str = ""                 # Regex over cell names (as the cell folders are named).


@dataclasses.dataclass(frozen=True)
class Job:
  """One run of a sweep: a cell, or a baseline that cells share. `config_text` is its config."""
  name: str
  overrides: dict[str, Any]
  config_text: str
  workdir: Path
  config_path: Path
  baseline: str | None = None  # Name of the shared baseline job this cell loads.

  @functools.cached_property
  def config(self) -> ml_collections.ConfigDict:
    """The job's config, parsed once from `config_text` (treat it as read-only)."""
    return ml_collections.ConfigDict(_read_literal(self.config_text))

  @property
  def label(self) -> str:
    """`cells/<name>` or `baselines/<name>`: unique in a sweep (a cell and a baseline may share
    a name)."""
    return f"{self.workdir.parent.name}/{self.name}"


@dataclasses.dataclass(frozen=True)
class Plan:
  settings: SweepSettings
  base: ml_collections.ConfigDict
  baselines: tuple[Job, ...]
  cells: tuple[Job, ...]

  @property
  def jobs(self) -> tuple[Job, ...]:
    """Every run in the order they can run in: shared baselines first."""
    return self.baselines + self.cells


def _comparisons(value: Any) -> tuple[Comparison, ...]:
  values = (value,) if isinstance(value, str) else value
  if not isinstance(values, (tuple, list)):
    raise ConfigError(f"sweep.compare must be a tuple of 'variant - variant' strings, got "
                      f"{value!r}")
  comparisons = []
  for item in values:
    parts = [p.strip() for p in str(item).split(" - ")] if isinstance(item, str) else []
    if len(parts) != 2 or not all(parts):
      raise ConfigError(f"sweep.compare entry {item!r} must read 'variant - variant' (spaces "
                        "around the minus), e.g. 'adcorda - same_budget_finetune'")
    comparisons.append(Comparison(*parts))
  return tuple(comparisons)


def _strings(section: ml_collections.ConfigDict, key: str, default: tuple[str, ...]
             ) -> tuple[str, ...]:
  value = section.get(key, default)
  values = (value,) if isinstance(value, str) else value
  if not isinstance(values, (tuple, list)) or not all(isinstance(v, str) and v for v in values):
    raise ConfigError(f"sweep.{key} must be a tuple of non-empty strings, got {value!r}")
  return tuple(values)


def read_sweep(config: ml_collections.ConfigDict) -> SweepSettings:
  """Checks `config.sweep`; one-line ConfigErrors name `sweep.<key>`."""
  section = config.get("sweep")
  if not isinstance(section, ml_collections.ConfigDict):
    raise ConfigError("config has no 'sweep' section; start from configs/sweep_adcorda_digits.py")
  cells = section.get("cells", axes.center())
  if (not isinstance(cells, (tuple, list)) or not cells
      or not all(isinstance(c, dict) and all(isinstance(k, str) for k in c) for c in cells)):
    raise ConfigError("sweep.cells must be a non-empty tuple of {dotted key: value} dicts "
                      "(build it with adcorda_jax.sweep.axes)")
  seed_key = section.get("seed_key", "seed")
  seeds = section.get("seeds", ())
  seeds = (seeds,) if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
  if (not isinstance(seeds, (tuple, list)) or len(set(seeds)) != len(seeds)
      or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds)):
    raise ConfigError(f"sweep.seeds must be a tuple of distinct integers >= 0 (() = the base "
                      f"config's {seed_key}), got {seeds!r}")
  if seeds and any(seed_key in cell for cell in cells):
    raise ConfigError(f"sweep.seeds and sweep.cells both set {seed_key!r}; set it in one")
  cells = axes.product(axes.chain(cells), axes.sweep(seed_key, seeds)) if seeds else (
      axes.chain(cells))
  order = list(dict.fromkeys(k for cell in cells for k in cell if k != seed_key))
  order += [seed_key] if any(seed_key in cell for cell in cells) else []
  only = section.get("only", "")
  try:
    pattern = re.compile(only) if isinstance(only, str) else None
  except re.error as e:
    raise ConfigError(f"sweep.only={only!r} is not a valid regular expression: {e}") from None
  if pattern is None:
    raise ConfigError(f"sweep.only must be a regular expression string, got {only!r}")
  command = section.get("command", DEFAULT_COMMAND)
  if not isinstance(command, str) or not {"{config}", "{workdir}"} <= set(
      re.findall(r"\{\w+\}", command)):
    raise ConfigError(f"sweep.command must be a string with {{config}} and {{workdir}} (and "
                      f"optionally {{python}}, {{main}}), got {command!r}")
  share = section.get("share_baseline", True)
  if not isinstance(share, bool):
    raise ConfigError(f"sweep.share_baseline must be True or False, got {share!r}")
  return SweepSettings(
      mode=config_checks.one_of(section, "mode", "sweep", MODES, default="run"),
      cells=tuple(cells), axis_keys=tuple(order), seed_key=seed_key,
      comparisons=_comparisons(section.get("compare", ())),
      metrics=_strings(section, "metrics", DEFAULT_METRICS), share_baseline=share,
      on_error=config_checks.one_of(section, "on_error", "sweep", ON_ERROR, default="stop"),
      command=command, only=only)


def python_literal(value: Any, where: str = "config") -> str:
  """`value` (plain config data) as Python source that `ast.literal_eval` reads back exactly."""
  if isinstance(value, dict):
    return "{" + ", ".join(f"{python_literal(k, where)}: {python_literal(v, f'{where}.{k}')}"
                           for k, v in value.items()) + "}"
  if isinstance(value, tuple):
    items = [python_literal(v, where) for v in value]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  if isinstance(value, list):
    return "[" + ", ".join(python_literal(v, where) for v in value) + "]"
  if isinstance(value, float) and not math.isfinite(value):
    return f"float({str(value)!r})"  # literal_eval cannot read inf; the config file can.
  if value is None or isinstance(value, (bool, int, float, str)):
    return repr(value)
  raise ConfigError(f"{where}={value!r} ({type(value).__name__}) cannot be written into a "
                    "cell's config file; use plain numbers, strings, tuples or dicts")


def _read_literal(text: str) -> Any:
  """`ast.literal_eval` plus the `float('inf')` spelling `python_literal` writes."""
  tree = ast.parse(text, mode="eval")

  class Floats(ast.NodeTransformer):
    def visit_Call(self, node: ast.Call) -> ast.AST:  # pylint: disable=invalid-name
      if (isinstance(node.func, ast.Name) and node.func.id == "float" and len(node.args) == 1
          and isinstance(node.args[0], ast.Constant)):
        return ast.Constant(float(node.args[0].value))
      return self.generic_visit(node)

  return ast.literal_eval(ast.fix_missing_locations(Floats().visit(tree)))


def config_file_text(config_text: str, title: str) -> str:
  """A config file for main.py holding exactly `config_text`."""
  return (f'"""{title}\n\nWritten by a sweep (task=sweep): the base config with this cell\'s '
          'overrides.\n"""\nimport ml_collections\n\n\ndef get_config():\n'
          f"  return ml_collections.ConfigDict({config_text})\n")


def _all_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
  keys = []
  for key, value in tree.items():
    keys.append(prefix + key)
    if isinstance(value, dict):
      keys += _all_keys(value, f"{prefix}{key}.")
  return keys


def apply_overrides(base: ml_collections.ConfigDict, overrides: dict[str, Any],
                    where: str) -> ml_collections.ConfigDict:
  """A copy of `base` with the dotted `overrides` set; one-line ConfigErrors name key and cell."""
  config = ml_collections.ConfigDict(base.to_dict())
  for key, value in overrides.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      node = node.get(section) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
      hint = difflib.get_close_matches(key, _all_keys(base.to_dict()), n=1)
      raise ConfigError(f"{where} sets {key!r}, which the base config does not have"
                        + (f"; did you mean {hint[0]!r}?" if hint else ""))
    try:
      node[field] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"{where} sets {key}={value!r}, which does not fit the base config's "
                        f"{type(node[field]).__name__} field: {str(e).splitlines()[0]}") from None
  return config


def _unique_names(cells: tuple[axes.Cell, ...], order: tuple[str, ...]) -> list[str]:
  names = []
  for cell in cells:
    name = axes.cell_name(cell, order)
    if len(name) > MAX_NAME or name in names:
      digest = hashlib.sha1(axes.cell_key(cell).encode()).hexdigest()[:8]
      name = f"{name[:MAX_NAME]},id={digest}"
    names.append(name)
  return names


def _literal(config: ml_collections.ConfigDict, where: str) -> str:
  text = python_literal(config.to_dict(), where)
  assert _read_literal(text) == config.to_dict()
  return text


def make_plan(config: ml_collections.ConfigDict, workdir: Path) -> Plan:
  """Every job of the sweep in `config` under `workdir` (nothing is written)."""
  settings = read_sweep(config)
  base = config.get("base")
  if not isinstance(base, ml_collections.ConfigDict) or not isinstance(base.get("task"), str):
    raise ConfigError("config.base must be the cells' config (a ConfigDict with a task), e.g. "
                      "config.base = configs.adcorda_digits.get_config()")
  if base.task == "sweep":
    raise ConfigError("config.base.task is 'sweep': a sweep's cells cannot be sweeps")
  shared_key = SHARED_BASELINE_KEYS.get(base.task) if settings.share_baseline else None
  baselines: dict[str, Job] = {}
  cells = []
  normalized = _without_base_values(base, settings)
  named = list(zip(_unique_names(normalized, settings.axis_keys), normalized, strict=True))
  if settings.only:
    named = [(name, cell) for name, cell in named if re.search(settings.only, name)]
    if not named:
      raise ConfigError(f"sweep.only={settings.only!r} matches no cell of this sweep")
  for name, overrides in named:
    where = f"sweep cell {name!r}"
    cell_config = apply_overrides(base, overrides, where)
    baseline_name = None
    if shared_key is not None and not _get(cell_config, shared_key):
      baseline_job = _baseline_job(cell_config, overrides, settings.axis_keys, workdir)
      baselines.setdefault(baseline_job.name, baseline_job)
      baseline_name = baseline_job.name
      cell_config = apply_overrides(cell_config, {shared_key: str(baseline_job.workdir)}, where)
    cells.append(Job(name=name, overrides=dict(overrides), config_text=_literal(cell_config, where),
                     workdir=workdir / "cells" / name,
                     config_path=workdir / "configs" / f"{name}.py", baseline=baseline_name))
  return Plan(settings=settings, base=base, baselines=tuple(baselines.values()),
              cells=tuple(cells))


def _without_base_values(base: ml_collections.ConfigDict, settings: SweepSettings
                         ) -> tuple[axes.Cell, ...]:
  """The cells with overrides that equal the base value dropped (the seed key kept), each
  distinct cell once: an axis may list the base value, and that cell is the base cell."""
  missing = object()  # A key the base lacks is kept: make_plan's apply_overrides names it.
  cells = []
  for cell in settings.cells:
    cells.append({k: v for k, v in cell.items() if k == settings.seed_key
                  or (base_value := _get(base, k, missing)) is missing
                  or fingerprint.normalized(v) != fingerprint.normalized(base_value)})
  return axes.chain(cells)


def _get(config: ml_collections.ConfigDict, key: str, default: Any = None) -> Any:
  """The value of dotted `key` in `config`, or `default` where a section or field is missing."""
  node: Any = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return default
    node = node[part]
  return node


def _baseline_job(cell_config: ml_collections.ConfigDict, overrides: dict[str, Any],
                  order: tuple[str, ...], workdir: Path) -> Job:
  """The task=train run of the cell's baseline, named by the overrides that change it."""
  train_config = baseline_lib.baseline_config(cell_config)
  relevant = {k: v for k, v in overrides.items()
              if k.split(".")[0] in baseline_lib.TRAIN_SECTIONS and not k.startswith("model.quant")
              and k not in fingerprint.RESUMABLE_KEYS}
  name = axes.cell_name(relevant, order)
  return Job(name=name, overrides=relevant, config_text=_literal(train_config, "baseline"),
             workdir=workdir / "baselines" / name,
             config_path=workdir / "configs" / "baselines" / f"{name}.py")


def effective_value(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value of dotted `key` in a cell's config (the base value where a cell leaves it)."""
  value = _get(config, key)
  return tuple(value) if isinstance(value, list) else value

"""AutoAttack (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T and Square, each on the survivors.

`version="standard"` runs the reference's four attacks in its order with its settings (100
iterations, 9 target classes, 5,000 Square queries, one restart each); `version="custom"` runs any
list of untargeted attacks. A point counts as robust only if every attack failed on it.

Over a split (`attack_split` with an `autoattack` spec) each attack is an ordinary resumable
`attack_split` run, in its own folder, on the points still robust after the previous attacks,
re-batched into as few batches of at most the configured size as hold them (equal sizes, so 280
survivors with batch 500 are one batch of 280): the cost falls with the survivors instead of
running masked full batches. Inside each attack's loop, only the points still unbroken are
evaluated (`compaction.on_active`). Attack j uses `fold_in(key, j)`, so the cascade is deterministic from
the seed and resumes per (attack, batch). The result carries the cascade: robust accuracy after
each attack, the points each one broke, and its seconds.

Inside a single batch (`AttackSpec.run`, e.g. under `jax.jit`) the attacks run on the whole batch
one after another and each point keeps the first success: the same robust accuracy, without the
savings.

Layout of an autoattack `out_dir`: attack.json, arrays.npz (merged, when finished) and
components/<j>_<attack>/ (each an `attack_split` folder).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from adcorda_jax import config_checks
from adcorda_jax.attacks.losses import AttackResult, LogitsFn, pick_per_example
from adcorda_jax.attacks.registry import ATTACKS, AttackMethod, register, untargeted_names
from adcorda_jax.errors import ConfigError

if TYPE_CHECKING:
  from adcorda_jax.attacks.driver import BatchCallback, SplitAttackResult
  from adcorda_jax.attacks.specs import AttackSpec

VERSIONS = ("standard", "custom")
STANDARD = ("apgd_ce", "apgd_t", "fab_t", "square")
COMPONENTS_DIR = "components"


def _read_autoattack(section: ml_collections.ConfigDict, prefix: str) -> dict[str, Any]:
  """The component specs: `<prefix>.version`, `<prefix>.attacks` (custom) and sub-sections.

  Each component reads its settings from its own sub-section of this one
  (`<prefix>.apgd.steps`, `<prefix>.square.queries`, ...), defaulting to the reference's.
  """
  from adcorda_jax.attacks.specs import parse_attack_names, spec_from_config

  version = config_checks.one_of(section, "version", prefix, VERSIONS, default="standard")
  allowed = tuple(name for name in untargeted_names() if name != "autoattack")
  if version == "standard":
    if "attacks" in section and section.attacks != ",".join(STANDARD):
      raise ConfigError(f"{prefix}.attacks is only read with {prefix}.version='custom' "
                        f"(standard runs {','.join(STANDARD)})")
    names = STANDARD
  else:
    names = parse_attack_names(section.get("attacks", ",".join(STANDARD)), f"{prefix}.attacks",
                               allowed)
  components = []
  for name in names:
    sub_section = ATTACKS.get(name).section
    # The norm is the autoattack spec's; `spec_from_config` sets it on the components.
    components.append(spec_from_config(name, "linf", section.get(sub_section),
                                       f"{prefix}.{sub_section}"))
  return {"components": tuple(components), "steps": 1}


def _run_autoattack(spec: AttackSpec, logits_fn: LogitsFn, params: Any, x: jax.Array,
                    labels: jax.Array, key: jax.Array, eps: jax.Array) -> AttackResult:
  """The cascade inside one batch: every attack on the whole batch, first success kept."""
  best, used = None, jnp.zeros(labels.shape, jnp.int32)
  for index, component in enumerate(spec.components):
    result = component.run(logits_fn, params, x, labels, jax.random.fold_in(key, index), eps)
    if best is None:
      best, used = result, result.steps_used
      continue
    still_robust = ~best.success
    used = used + jnp.where(still_robust, result.steps_used, 0)
    best = pick_per_example(still_robust & result.success, result, best)
  return best.replace(steps_used=used)


def _describe(spec: AttackSpec) -> str:
  names = ", ".join(c.describe() for c in spec.components)
  standard = tuple(c.name for c in spec.components) == STANDARD
  return f"autoattack {'standard' if standard else 'custom'} {spec.norm}: {names}"


def survivor_batch_size(count: int, batch_size: int, devices: int) -> int:
  """The batch for `count` points: as few batches of at most `batch_size` as hold them, of equal
  size rounded up to a multiple of gcd(batch_size, 64) (and of `devices`).

  The multiple depends on the configured batch only (whenever it is a multiple of the device
  count, as for 1, 2 or 4 devices and a batch of 500 or 256), so the batches, and with them the
  random draws, are the same on any such number of devices.
  """
  multiple = math.lcm(math.gcd(batch_size, 64), devices)
  batches = -(-count // batch_size)
  size = -(-count // batches)
  return min(-(-size // multiple) * multiple, batch_size)


def _cascade_record(component: AttackSpec, attacked: int, broken: int, robust: int,
                    total: int, seconds: float) -> dict[str, Any]:
  return {"attack": component.name, "description": component.describe(), "attacked": attacked,
          "broken": broken, "robust_accuracy": robust / total if total else 0.0,
          "seconds": seconds}


def autoattack_split(spec: AttackSpec, logits_fn: LogitsFn, params: Any, images: np.ndarray,
                     labels: np.ndarray, *, eps: float, batch_size: int, key: jax.Array,
                     mesh: jax.sharding.Mesh, out_dir: Path | None, save_adversarial: bool,
                     description: str, batch_size_key: str,
                     batch_callback: BatchCallback | None) -> SplitAttackResult:
  """`attack_split` for an autoattack spec: the cascade, each attack on the survivors."""
  from adcorda_jax.attacks import driver

  total = len(labels)
  components_dir = None
  if out_dir is not None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    driver.claim(out_dir, driver.fingerprint(spec, eps, images, labels, batch_size, key,
                                             save_adversarial))
    components_dir = out_dir / COMPONENTS_DIR

  start = time.perf_counter()
  robust = None          # [N] bool: correct under every attack so far.
  broken_by = np.full(total, -1, np.int16)  # Index of the attack that broke it; -1 none.
  steps_used = np.zeros(total, np.int32)
  perturbation = np.zeros(total, np.float32)
  adversarial = np.array(images, copy=True) if save_adversarial else None
  clean_prediction = clean_correct = None
  cascade, computed, loaded = [], 0, 0
  for index, component in enumerate(spec.components):
    rows = np.arange(total) if robust is None else np.flatnonzero(robust)
    if len(rows) == 0:
      cascade.append(_cascade_record(component, 0, 0, 0, total, 0.0))
      continue
    result = driver.attack_split(
        component, logits_fn, params, images[rows], labels[rows], eps=eps,
        batch_size=survivor_batch_size(len(rows), batch_size, mesh.devices.size), key=jax.random.fold_in(key, index), mesh=mesh,
        out_dir=None if components_dir is None else components_dir / f"{index}_{component.name}",
        save_adversarial=save_adversarial,
        description=f"{description} [{index + 1}/{len(spec.components)} {component.name}]",
        batch_size_key=batch_size_key, batch_callback=batch_callback)
    computed += result.computed_batches
    loaded += result.loaded_batches
    if robust is None:  # The first attack sees every point: the clean predictions come from it.
      clean_prediction, clean_correct = result.clean_prediction, result.clean_correct
      robust = clean_correct.copy()
    broke = result.success & robust[rows]
    broken_rows = rows[broke]
    robust[broken_rows] = False
    broken_by[broken_rows] = index
    steps_used[rows] += result.steps_used
    perturbation[broken_rows] = result.perturbation_norm[broke]
    if adversarial is not None:
      adversarial[broken_rows] = result.adversarial[broke]
    cascade.append(_cascade_record(component, len(rows), int(broke.sum()), int(robust.sum()),
                                   total, result.seconds))
    logging.info("%s: %s broke %d of %d points; robust accuracy %.4f.", description,
                 component.name, int(broke.sum()), len(rows), robust.mean())

  arrays = {"clean_prediction": clean_prediction, "clean_correct": clean_correct,
            "success": ~robust, "final_correct": robust, "steps_used": steps_used,
            "perturbation_norm": perturbation, "broken_by": broken_by,
            "seconds": np.float64(sum(record["seconds"] for record in cascade))}
  if adversarial is not None:
    arrays["adversarial"] = adversarial
  path = None
  if out_dir is not None:
    path = out_dir / driver.ARRAYS_FILE
    driver.save_npz_atomic(path, arrays)
  logging.info("%s: robust accuracy %.4f after %d attacks (%.1f s here).", description,
               robust.mean(), len(spec.components), time.perf_counter() - start)
  return driver.SplitAttackResult(
      spec=spec, eps=eps, adversarial=arrays.get("adversarial"),
      seconds=float(arrays["seconds"]), computed_batches=computed, loaded_batches=loaded,
      path=path, details={"cascade": cascade, "broken_by": broken_by},
      **{name: arrays[name] for name in driver.PER_EXAMPLE})


register(AttackMethod(
    name="autoattack", section="autoattack", read=_read_autoattack, run=_run_autoattack,
    describe=_describe, run_split=autoattack_split))


def autoattack_spec(norm: str = "linf", version: str = "standard",
                    attacks: str | None = None,
                    settings: dict[str, dict[str, Any]] | None = None) -> AttackSpec:
  """The autoattack spec of `version` (custom: the comma-separated `attacks`) for `norm`.

  `settings` maps a component's config section to overrides, e.g. {"square": {"queries": 1000}}.
  """
  from adcorda_jax.attacks.specs import spec_from_config

  section = ml_collections.ConfigDict({"version": version, **(settings or {})})
  if attacks is not None:
    section.attacks = attacks
  return spec_from_config("autoattack", norm, section, "autoattack")


def autoattack(logits_fn: LogitsFn, params: Any, images: np.ndarray, labels: np.ndarray, *,
               key: jax.Array, eps: float, norm: str = "linf", version: str = "standard",
               attacks: str | None = None, batch_size: int = 256,
               mesh: jax.sharding.Mesh | None = None,
               out_dir: Path | None = None) -> SplitAttackResult:
  """AutoAttack over (images, labels) on the host, each attack on the survivors, in memory.

  A notebook shorthand for `attack_split(autoattack_spec(norm, version, attacks), ...)` on
  every local device (or `mesh`); `batch_size` must divide over the mesh. With `out_dir` it
  resumes like any attack run. `result.details["cascade"]` lists each attack's share.
  """
  from adcorda_jax.attacks import driver
  from adcorda_jax.training import sharding

  mesh = sharding.make_mesh() if mesh is None else mesh
  return driver.attack_split(autoattack_spec(norm, version, attacks), logits_fn, params, images,
                             labels, eps=eps, batch_size=batch_size, key=key, mesh=mesh,
                             out_dir=out_dir, description="autoattack")

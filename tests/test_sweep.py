"""task=sweep: axes, the plan (cells as ordinary configs and workdirs, shared baselines), paired
statistics, run/commands/collect end to end, and one-line errors naming the sweep key or cell."""
from __future__ import annotations

import json
import math
import os
import runpy
import shlex
import subprocess
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from scipy import stats

from adcorda_jax.errors import AdcordaError, ConfigError
from adcorda_jax.reporting import sweep_report
from adcorda_jax.sweep import aggregate, axes, plan as plan_lib
from adcorda_jax.tasks import sweep as sweep_task
from configs import sweep_adcorda_digits, tiny
from tests.helpers import one_line

REPO = Path(__file__).resolve().parents[1]


def test_axes_product_zip_chain():
  grid = axes.product(axes.sweep("a", (1, 2)), axes.sweep("b", ("x", "y")))
  assert grid == ({"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"})
  zipped = axes.zipit(axes.sweep("a", (1, 2)), axes.sweep("c", (0.1, 0.2)))
  assert zipped == ({"a": 1, "c": 0.1}, {"a": 2, "c": 0.2})
  assert axes.chain(axes.center(), axes.sweep("a", (1, 2)), axes.sweep("a", (2, 3))) == (
      {}, {"a": 1}, {"a": 2}, {"a": 3})
  with pytest.raises(ValueError, match="one length"):
    axes.zipit(axes.sweep("a", (1, 2)), axes.sweep("c", (1,)))
  with pytest.raises(ValueError, match="sets 'a' twice"):
    axes.product(axes.sweep("a", (1,)), axes.sweep("a", (2,)))
  assert axes.cell_name({"seed": 1, "x.y": 0.05, "t": (1 / 255, "a b")}, ("x.y", "seed")) == (
      "x.y=0.05,seed=1,t=0.003922-a_b")
  assert axes.cell_name({}, ()) == "base"


def _sweep_config(base=None, **sweep):
  config = ml_collections.ConfigDict()
  config.task = "sweep"
  config.base = base if base is not None else tiny.get_config()
  config.sweep = ml_collections.ConfigDict(
      {"cells": axes.sweep("train.learning_rate", (0.05, 0.1)), "seeds": (0,),
       "compare": (), "metrics": ("test_accuracy",), **sweep})
  return config


@pytest.mark.parametrize("sweep, expected", [
    ({"mode": "launch"}, "sweep.mode='launch' is not valid"),
    ({"compare": ("adcorda-baseline",)}, "sweep.compare entry 'adcorda-baseline' must read"),
    ({"cells": ({"train.learning_rat": 0.1},)},
     "sets 'train.learning_rat', which the base config does not have; did you mean "
     "'train.learning_rate'?"),
    ({"cells": ({"train.epochs": "two"},)}, "sets train.epochs='two', which does not fit"),
    ({"only": "nothing"}, "sweep.only='nothing' matches no cell"),
    ({"cells": ({"seed": 1},), "seeds": (0, 1)}, "sweep.seeds and sweep.cells both set 'seed'"),
    ({"seeds": (0, 0)}, "sweep.seeds must be a tuple of distinct integers"),
    ({"command": "python main.py"}, "sweep.command must be a string with {config} and"),
])
def test_bad_sweep_settings_are_one_line_errors(tmp_path, sweep, expected):
  with pytest.raises(ConfigError) as error:
    sweep_task.run_sweep(_sweep_config(**sweep), tmp_path / "sweep")
  assert expected in one_line(error)
  assert not (tmp_path / "sweep").exists()  # Checked before anything is written.


def test_a_bad_cell_value_is_named_before_any_cell_runs(tmp_path):
  config = _sweep_config(sweep_adcorda_digits.get_config().base,
                         cells=axes.sweep("correct.eps", (0.1, 0.0)))
  with pytest.raises(ConfigError) as error:
    sweep_task.run_sweep(config, tmp_path)
  assert one_line(error).startswith("sweep cell 'correct.eps=0,seed=0': correct.eps must be > 0")
  assert not (tmp_path / "cells").exists() and not (tmp_path / "baselines").exists()


def test_python_literal_round_trips_config_values():
  value = {"a": (1, 2.5, "x"), "b": [True, None], "c": {"d": (7,)}, "e": float("inf"),
           "f": -float("inf"), "g": 1 / 3}
  text = plan_lib.python_literal(value)
  assert plan_lib._read_literal(text) == value  # pylint: disable=protected-access
  with pytest.raises(ConfigError, match="config.h="):
    plan_lib.python_literal({"h": object()})


def test_plan_shares_float_baselines_and_drops_base_values(tmp_path):
  config = sweep_adcorda_digits.get_config()
  config.sweep.cells = axes.chain(axes.center(), axes.sweep("train.epochs", (1, 3)),
                                  axes.sweep("model.quant.weight_bits", (0, 2)))
  config.sweep.seeds = (0, 1)
  plan = plan_lib.make_plan(config, tmp_path)
  # train.epochs=1 and weight_bits=0 are the base values: those cells are the base cell.
  assert [job.name for job in plan.cells] == [
      "seed=0", "seed=1", "train.epochs=3,seed=0", "train.epochs=3,seed=1",
      "model.quant.weight_bits=2,seed=0", "model.quant.weight_bits=2,seed=1"]
  # Quantized cells load the float baseline of their seed; a longer baseline is its own run.
  assert [job.name for job in plan.baselines] == [
      "seed=0", "seed=1", "train.epochs=3,seed=0", "train.epochs=3,seed=1"]
  by_name = {job.name: job for job in plan.cells}
  assert by_name["model.quant.weight_bits=2,seed=1"].baseline == "seed=1"
  cell = by_name["model.quant.weight_bits=2,seed=1"].config
  assert cell.adcorda.baseline_checkpoint == str(tmp_path / "baselines" / "seed=1")
  assert cell.model.quant.weight_bits == 2 and cell.seed == 1
  baseline = plan.baselines[1].config
  assert baseline.task == "train" and "quant" not in baseline.model  # The float network.
  # sweep.only matches the cell names as the folders are named, and keeps their baselines.
  config.sweep.only = "^(train|seed=1$)"
  subset = plan_lib.make_plan(config, tmp_path)
  assert [job.name for job in subset.cells] == ["seed=1", "train.epochs=3,seed=0",
                                                "train.epochs=3,seed=1"]
  assert [job.name for job in subset.baselines] == ["seed=1", "train.epochs=3,seed=0",
                                                    "train.epochs=3,seed=1"]
  # The written config file is the same config main.py would load.
  path = tmp_path / "cell.py"
  path.write_text(plan_lib.config_file_text(by_name["seed=0"].config_text, "test"))
  loaded = runpy.run_path(str(path))["get_config"]()
  assert loaded.to_dict() == by_name["seed=0"].config.to_dict()


def test_paired_differences_and_their_interval():
  result = aggregate.paired([1.0, 2.0, 3.0])
  half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
  assert result["mean"] == 2.0 and result["n"] == 3
  assert result["low"] == pytest.approx(2 - half) and result["high"] == pytest.approx(2 + half)
  assert result["verdict"] == "within noise"  # half = 2.48 > 2.
  assert aggregate.paired([1.0, 1.1, 0.9, 1.0])["verdict"] == "higher"
  assert aggregate.paired([-1.0, -1.1, -0.9])["verdict"] == "lower"
  assert aggregate.paired([0.5])["verdict"] == "one seed"


def test_groups_pair_by_cell_seed_and_run_seed():
  """A once-per-cell variant (the baseline) pairs with every run seed of its cell."""
  group = aggregate.Group(name="base", overrides={}, axis_values={})
  for cell_seed, shift in ((0, 0.0), (1, 0.1)):
    group.add(cell_seed, [
        aggregate.Row("baseline", None, {"test_accuracy": 0.5 + shift}),
        aggregate.Row("adcorda", 0, {"test_accuracy": 0.7 + shift}),
        aggregate.Row("adcorda", 1, {"test_accuracy": 0.8 + shift}),
        aggregate.Row("control", 0, {"test_accuracy": 0.6 + shift}),
        aggregate.Row("control", 1, {"test_accuracy": 0.6 + shift})])
  tables = aggregate.aggregate_groups(
      [group], [plan_lib.Comparison("adcorda", "control"), plan_lib.Comparison("adcorda",
                                                                              "baseline")],
      ("test_accuracy",))
  entry = tables["groups"][0]
  assert entry["units"] == 4
  assert entry["variants"]["baseline"]["test_accuracy"]["n"] == 4
  against_control = entry["comparisons"]["adcorda - control"]["test_accuracy"]
  assert against_control["n"] == 4
  assert against_control["mean"] == pytest.approx(np.mean([0.1, 0.2, 0.1, 0.2]))
  assert entry["comparisons"]["adcorda - baseline"]["test_accuracy"]["mean"] == pytest.approx(
      0.25)


def test_report_tables_and_plots_of_two_axis_values(tmp_path):
  groups = []
  for name, gain in (("base", 0.1), ("adapt.lambda_=3", 0.3)):
    group = aggregate.Group(name=name, overrides={}, axis_values={"adapt.lambda_": 1.0 if
                                                                  name == "base" else 3.0})
    for seed, noise in enumerate((0.0, 0.02, -0.02)):
      group.add(seed, [aggregate.Row("control", 0, {"test_accuracy": 0.5}),
                       aggregate.Row("adcorda", 0, {"test_accuracy": 0.5 + gain + noise})])
    groups.append(group)
  tables = aggregate.aggregate_groups(groups, [plan_lib.Comparison("adcorda", "control")],
                                      ("test_accuracy",))
  results = {**tables, "axes": ["adapt.lambda_"], "seed_key": "seed", "base_task": "adcorda",
             "cells_total": 6, "cells_complete": 6, "runs_wall_seconds": 60.0,
             "wall_seconds": 1.0, "cells": []}
  report = sweep_report.sweep_markdown(results)
  half = 100 * stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)
  assert (f"| `adapt.lambda_=3` | 3 | +30.00 [{30 - half:+.2f}, {30 + half:+.2f}] **higher** |"
          in report)
  assert "| `base` | 3 | 50.00 ± 0.00 | 60.00 ± 2.00 | +10.00 [" in report
  for plot in sweep_report.map_plots(results, tmp_path):
    plot()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["by_axis_test_accuracy.png",
                                                        "map_test_accuracy.png"]


def test_comparing_a_variant_no_cell_has_is_named():
  group = aggregate.Group(name="base", overrides={}, axis_values={})
  group.add(0, [aggregate.Row("adcorda", 0, {"test_accuracy": 0.5})])
  with pytest.raises(ConfigError) as error:
    aggregate.aggregate_groups([group], [plan_lib.Comparison("adcorda", "same_budget")],
                               ("test_accuracy",))
  assert "sweep.compare names 'same_budget', which no finished cell has" in one_line(error)


def test_selected_metrics_expand_prefixes():
  available = ["test_accuracy", "robust.pgd@0.05", "robust.apgd_ce@0.05", "val_accuracy"]
  assert aggregate.selected_metrics(available, ("test_accuracy", "robust")) == [
      "test_accuracy", "robust.apgd_ce@0.05", "robust.pgd@0.05"]


def _numbers(results):
  return [(g["name"], g["variants"]) for g in results["groups"]]


@pytest.mark.slow
def test_run_mode_caches_cells_and_refuses_a_changed_cell(tmp_path):
  config = _sweep_config(seeds=(0, 1))
  results = sweep_task.run_sweep(config, tmp_path)
  assert results["cells_complete"] == results["cells_total"] == 4
  # 0.05 is tiny.py's own learning rate: that cell is the base cell.
  assert [g["name"] for g in results["groups"]] == ["base", "train.learning_rate=0.1"]
  assert all(g["units"] == 2 for g in results["groups"])
  for name in ("results.json", "report.md", "configs/sweep.py", "by_axis_test_accuracy.png",
               "cells/train.learning_rate=0.1,seed=1/results.json"):
    assert (tmp_path / name).exists(), name
  ran = []
  again = sweep_task.run_sweep(config, tmp_path, job_callback=ran.append)
  assert ran == [] and _numbers(again) == _numbers(results)
  # A cell whose config changed is refused by that cell, as a single run would be.
  config.base.train.batch_size = 64
  with pytest.raises(ConfigError) as error:
    sweep_task.run_sweep(config, tmp_path)
  message = one_line(error)
  assert message.startswith("sweep run 'cells/seed=0': workdir")
  assert "train.batch_size" in message


@pytest.mark.slow
def test_on_error_continue_runs_the_other_cells(tmp_path):
  config = _sweep_config(cells=axes.sweep("train.learning_rate", (0.1, -1.0)),
                         on_error="continue")
  with pytest.raises(AdcordaError) as error:
    sweep_task.run_sweep(config, tmp_path)
  assert "1 of 2 sweep runs failed (cells/train.learning_rate=-1,seed=0)" in one_line(error)
  saved = json.loads((tmp_path / "results.json").read_text())
  status = {cell["name"]: cell["status"] for cell in saved["cells"]}
  assert status["train.learning_rate=0.1,seed=0"] == "complete"
  assert status["train.learning_rate=-1,seed=0"].startswith("failed: train.learning_rate")


@pytest.mark.slow
@pytest.mark.subprocess
def test_commands_then_collect_equals_running_here(tmp_path):
  """Two adcorda cells (and their shared baseline) run from commands.txt by main.py, then
  collected: the same numbers as the sweep run in this process."""
  base = sweep_adcorda_digits.get_config().base
  base.data.max_train_examples = 400
  base.adapt.epochs = 1
  base.correct.steps = 5
  base.evaluate.max_examples = 64
  base.evaluate.pgd.steps = 3
  config = _sweep_config(base, cells=axes.chain(axes.center(),
                                                axes.sweep("adapt.direction", ("reverse",))),
                         compare=("adcorda - same_budget_finetune",))
  here = sweep_task.run_sweep(config, tmp_path / "here")
  config.sweep.mode = "commands"
  written = sweep_task.run_sweep(config, tmp_path / "there")
  lines = (tmp_path / "there" / "commands.txt").read_text().splitlines()
  assert lines == written["commands"] and len(lines) == 3  # The shared baseline first.
  assert lines[0].split()[-1].endswith(shlex.quote(str(tmp_path / "there" / "baselines" /
                                                       "seed=0")))
  assert "--array=1-2 slurm_array.sh cell_commands.txt" in (
      tmp_path / "there" / "submit_slurm.sh").read_text()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for line in lines:
    out = subprocess.run(line, shell=True, cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
  out = subprocess.run(written["collect"], shell=True, cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  collected = json.loads((tmp_path / "there" / "results.json").read_text())
  assert collected["cells_complete"] == 2
  assert _numbers(collected) == _numbers(json.loads(json.dumps(here)))
  assert collected["groups"][0]["comparisons"] == json.loads(json.dumps(
      here["groups"][0]["comparisons"]))
  assert "## Map: paired differences" in (tmp_path / "there" / "report.md").read_text()
  for plot in ("map_test_accuracy.png", "by_axis_test_accuracy.png"):  # sweep.metrics.
    assert (tmp_path / "there" / plot).exists(), plot
  # The cells' results.json files alone, in another workdir: both cells count as done there, and
  # their shared baseline (recorded at the old path) is not trained again.
  for cell in (tmp_path / "there" / "cells").iterdir():
    copy = tmp_path / "copy" / "cells" / cell.name
    copy.mkdir(parents=True)
    (copy / "results.json").write_text((cell / "results.json").read_text())
  config.sweep.mode = "run"
  ran = []
  copied = sweep_task.run_sweep(config, tmp_path / "copy", job_callback=ran.append)
  assert ran == [] and copied["cells_complete"] == 2
  assert _numbers(json.loads(json.dumps(copied))) == _numbers(collected)

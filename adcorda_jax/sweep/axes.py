"""Sweep axes: build the cells of a sweep as plain data, in the style of Google's `hyper` module.

A cell is a dict {dotted config key: value} of overrides on the sweep's base config. These
helpers build tuples of cells, which a sweep config stores in `sweep.cells`:

    cells = axes.chain(
        axes.product(axes.sweep("train.epochs", (1, 3)), axes.sweep("model.width", (0.5, 1.0))),
        axes.zipit(axes.sweep("correct.eps", (0.05, 0.1)), axes.sweep("correct.steps", (10, 20))),
    )

`product` is every combination, `zipit` pairs values position by position, `chain` is the union
in order (duplicates kept once): one-at-a-time maps are a chain of single-axis sweeps around a
`center()`. Seeds usually stay out of `cells`: `sweep.seeds` multiplies every cell by them.
"""
from __future__ import annotations

import itertools
import re
from typing import Any, Iterable, Mapping, Sequence

Cell = dict[str, Any]
Cells = tuple[Cell, ...]


def center() -> Cells:
  """The base config itself: one cell without overrides."""
  return ({},)


def sweep(key: str, values: Iterable[Any]) -> Cells:
  """One axis: a cell per value of `key`."""
  values = tuple(values)
  if not values:
    raise ValueError(f"sweep({key!r}, ...) needs at least one value")
  return tuple({key: value} for value in values)


def product(*parts: Sequence[Mapping[str, Any]]) -> Cells:
  """Every combination of one cell from each part (later parts vary fastest)."""
  return tuple(_merged(combination) for combination in itertools.product(*parts))


def zipit(*parts: Sequence[Mapping[str, Any]]) -> Cells:
  """Cell i of every part merged together; the parts must be the same length."""
  lengths = {len(part) for part in parts}
  if len(lengths) > 1:
    raise ValueError(f"zipit needs parts of one length, got {sorted(lengths)}")
  return tuple(_merged(combination) for combination in zip(*parts))


def chain(*parts: Sequence[Mapping[str, Any]]) -> Cells:
  """The cells of every part in order, each distinct set of overrides once."""
  seen, cells = set(), []
  for part in parts:
    for cell in part:
      key = cell_key(cell)
      if key not in seen:
        seen.add(key)
        cells.append(dict(cell))
  return tuple(cells)


def _merged(cells: Iterable[Mapping[str, Any]]) -> Cell:
  """One cell with the overrides of all `cells`; a key set to two values is an error."""
  merged: Cell = {}
  for cell in cells:
    for key, value in cell.items():
      if key in merged and merged[key] != value:
        raise ValueError(f"a combined cell sets {key!r} twice ({merged[key]!r} and {value!r})")
      merged[key] = value
  return merged


def cell_key(cell: Mapping[str, Any]) -> str:
  """A canonical text of a cell's overrides (sorted keys), to compare cells."""
  return repr(sorted((key, _frozen(value)) for key, value in cell.items()))


def _frozen(value: Any) -> Any:
  return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def value_text(value: Any) -> str:
  """A short, path-safe text of an override value: 0.05, 4, True, a-b (tuples joined by -)."""
  if isinstance(value, (list, tuple)):
    return "-".join(value_text(v) for v in value) or "none"
  if isinstance(value, float):
    text = f"{value:.4g}"
  else:
    text = str(value)
  return re.sub(r"[^A-Za-z0-9.+-]", "_", text) or "empty"


def cell_name(cell: Mapping[str, Any], order: Sequence[str]) -> str:
  """`key=value,key=value` in axis order `order` (keys not in it last, sorted); "base" if none."""
  keys = [k for k in order if k in cell] + sorted(k for k in cell if k not in order)
  return ",".join(f"{key}={value_text(cell[key])}" for key in keys) or "base"

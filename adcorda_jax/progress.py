"""Progress for long loops: a tqdm bar on a terminal, periodic log lines with rate and ETA elsewhere.

Logs in CI or a notebook's captured stderr stay readable (one line every `log_interval` seconds)
while an interactive user gets a live bar.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import tqdm
from absl import logging

from adcorda_jax import workdir as workdir_lib


class Progress:
  """Counts work units toward `total` and reports rate and ETA."""

  def __init__(self, total: int, description: str, unit: str = "step", initial: int = 0,
               log_interval: float = 10.0, interactive: bool | None = None):
    self.total, self.done, self.description, self.unit = total, initial, description, unit
    self.log_interval = log_interval
    self._start_done = initial
    self._start = self._last_log = time.perf_counter()
    self._postfix: dict[str, Any] = {}
    if interactive is None:  # One bar per run: a multi-process run's other processes draw none.
      interactive = sys.stderr.isatty() and workdir_lib.is_writer()
    self._bar = (tqdm.tqdm(total=total, initial=initial, desc=description, unit=unit,
                           dynamic_ncols=True, leave=False) if interactive else None)

  @property
  def rate(self) -> float:
    """Units per second since this progress started (resumed units excluded)."""
    elapsed = time.perf_counter() - self._start
    return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

  def skip(self, count: int = 1) -> None:
    """Counts `count` units finished earlier (e.g. cached): they advance the total, not the rate."""
    self.done += count
    self._start_done += count
    if self._bar is not None:
      self._bar.update(count)

  def update(self, count: int = 1, **postfix: Any) -> None:
    self.done += count
    if postfix:
      self._postfix = postfix
    if self._bar is not None:
      self._bar.update(count)
      if postfix:
        self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
      return
    now = time.perf_counter()
    if now - self._last_log >= self.log_interval or self.done >= self.total:
      self._last_log = now
      logging.info("%s", self.line())

  def line(self) -> str:
    """`description: done/total (pct), rate unit/s, ETA h:mm:ss, k=v ...`."""
    rate = self.rate
    remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
    eta = tqdm.tqdm.format_interval(remaining) if remaining == remaining else "?"
    extras = " ".join(f"{k}={_short(v)}" for k, v in self._postfix.items())
    percent = 100.0 * self.done / max(self.total, 1)
    return (f"{self.description}: {self.done}/{self.total} ({percent:.0f}%), "
            f"{rate:.1f} {self.unit}/s, ETA {eta} {extras}").rstrip()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _short(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)

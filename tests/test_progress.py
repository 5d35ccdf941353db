"""Progress lines: rate and ETA count only the work done in this call."""
from absl import logging

from adcorda_jax.progress import Progress


def test_skipped_units_advance_the_count_but_not_the_rate(monkeypatch):
  now = [0.0]
  monkeypatch.setattr("adcorda_jax.progress.time.perf_counter", lambda: now[0])
  progress = Progress(10, "study", unit="cell", interactive=False)
  progress.skip(6)   # six cells cached: they took no time in this call.
  now[0] = 10.0
  progress.update(2)  # two cells computed in 10 s -> 0.2 cell/s, 2 left -> 10 s.
  assert progress.rate == 0.2
  line = progress.line()
  assert line.startswith("study: 8/10 (80%), 0.2 cell/s, ETA 00:10"), line


def test_update_logs_a_line_with_the_postfix(monkeypatch):
  lines = []
  monkeypatch.setattr(logging, "info", lambda fmt, *args: lines.append(fmt % args))
  progress = Progress(2, "eval", interactive=False, log_interval=1e9)
  progress.update(1)
  assert not lines  # not yet due, not finished.
  progress.update(1, accuracy=0.5)
  assert len(lines) == 1 and lines[0].startswith("eval: 2/2 (100%)")
  assert lines[0].endswith("accuracy=0.5")

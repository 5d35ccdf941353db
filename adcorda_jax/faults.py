"""Failure injection for tests: make interrupts, full disks and crashes happen on cue.

Set `ADCORDA_FAULTS` to a comma-separated list of `point@n=action`: at the n-th time (1-based,
`*` for every time) the code passes `faults.point(name)`, do `action`:

- `sigint` / `sigterm`: send that signal to this process (it arrives as a real signal would);
- `enospc`: raise `OSError(ENOSPC)` as a full disk does;
- `crash`: `os._exit(137)`, like `kill -9` (nothing is cleaned up).

Points: `train_step` (after each training, fine-tuning or distillation step), `attack_batch`
(after each saved batch of an attack or correction run), `checkpoint_write` (inside a checkpoint
save, before orbax writes), `artifact_write` (inside an atomic artifact write).
E.g. `ADCORDA_FAULTS=checkpoint_write@2=sigint`. Unset, every point is one environment lookup.
`reset()` restarts the counts (tests that reuse one plan in one process).
"""
from __future__ import annotations

import collections
import errno
import os
import signal

ENV = "ADCORDA_FAULTS"
ACTIONS = ("sigint", "sigterm", "enospc", "crash")
# Passes per (plan, point) in this process: a new ADCORDA_FAULTS value starts counting afresh.
_counts: collections.Counter[tuple[str, str]] = collections.Counter()


def _plan(spec: str) -> dict[str, list[tuple[str, str]]]:
  plan: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
  for item in filter(None, (part.strip() for part in spec.split(","))):
    where, _, action = item.partition("=")
    name, _, when = where.partition("@")
    if action not in ACTIONS or not name or not (when == "*" or when.isdigit()):
      raise ValueError(f"{ENV}: cannot parse {item!r}; expected point@n=action with action in "
                       f"{', '.join(ACTIONS)}")
    plan[name].append((when, action))
  return plan


def point(name: str, path: str | os.PathLike | None = None) -> None:
  """Injects the fault planned for the current pass of point `name`, if any."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  _counts[spec, name] += 1
  for when, action in _plan(spec).get(name, ()):
    if when == "*" or int(when) == _counts[spec, name]:
      if action == "crash":
        os._exit(137)
      if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path else None)
      os.kill(os.getpid(), signal.SIGINT if action == "sigint" else signal.SIGTERM)


def reset() -> None:
  """Forgets how often each point was passed."""
  _counts.clear()

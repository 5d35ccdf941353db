"""SIGINT and SIGTERM as a clean stop: finish the write in flight, save once, exit 130 / 143.

`graceful_signals()` (installed by `main.py`) turns both signals into `Interrupted`, a
`KeyboardInterrupt`, so every loop that saves on Ctrl-C saves on SIGTERM too (what SLURM,
Kubernetes and Colab send). `deferred()` wraps each write that must not be cut in half (a
checkpoint, an atomic artifact): a signal arriving inside it is held and re-delivered once the
write is complete. Neither keeps state of its own: the pending signal lives in the handler that
`deferred()` installs for its duration, and nesting works because re-delivery goes through
whatever handler was there before.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """A run stopped by SIGINT or SIGTERM; `saved` says what was saved on the way out."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum
    self.saved: str | None = None

  @property
  def exit_code(self) -> int:
    return 128 + self.signum  # The shell's convention: 130 for SIGINT, 143 for SIGTERM.


def _in_main_thread() -> bool:
  return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handling(handler: Callable[[int, object], None]) -> Iterator[None]:
  """`handler` for SIGINT and SIGTERM within the block; the previous handlers after it."""
  previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
  try:
    yield
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


@contextlib.contextmanager
def graceful_signals() -> Iterator[None]:
  """Within the block, SIGINT and SIGTERM raise `Interrupted` (in the main thread)."""
  if not _in_main_thread():
    yield
    return

  def interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)

  with _handling(interrupt):
    yield


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Holds SIGINT/SIGTERM arriving within the block and delivers the first one after it."""
  if not _in_main_thread():
    yield
    return
  received: list[int] = []
  try:
    with _handling(lambda signum, frame: received.append(signum)):
      yield
  finally:
    if received:
      signal.raise_signal(received[0])  # Through the restored handler, as if it came now.


def record_save(interrupt: KeyboardInterrupt, saved: str) -> None:
  """Notes on `interrupt` what was saved, for the one line `main.py` prints."""
  if isinstance(interrupt, Interrupted):
    interrupt.saved = saved


def exit_now(code: int) -> None:
  """Exits after an interrupt without interpreter teardown.

  Everything worth keeping is on disk by then (checkpoints and artifacts are written
  synchronously); tearing down while XLA's threads may still be inside an interrupted
  compilation or computation can crash the process (exit 139 instead of 130/143).
  """
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  logging.shutdown()
  os._exit(code)

"""Keeps the run log readable: library INFO chatter (orbax logs ~20 lines per save) is dropped.

Libraries that log through absl share one logger with this package, so the filter goes by the
emitting file. Warnings and errors from those libraries still show.
"""
from __future__ import annotations

import logging as std_logging
import os

from absl import logging

_QUIET_PACKAGES = (f"{os.sep}orbax{os.sep}",)


class _QuietLibraries(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return not any(package in record.pathname for package in _QUIET_PACKAGES)


def quiet_library_logs() -> None:
  """Drops INFO/DEBUG records emitted by noisy libraries (idempotent)."""
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietLibraries) for f in logger.filters):
    logger.addFilter(_QuietLibraries())

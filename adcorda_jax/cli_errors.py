"""One-line messages for failures the command line reports before or around a task.

Flag parsing errors come from absl, ml_collections' config flags (which load the config file
lazily and wrap its errors) and the config file's own code; a full disk can surface wrapped by
orbax, tensorstore or numpy. Each is reduced to one line naming the flag, file or path.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

from adcorda_jax import workdir as workdir_lib


def _lines(error: BaseException) -> list[str]:
  """The message lines of `error`, unwrapping ml_collections' repr-of-KeyError messages."""
  value: object = error
  while isinstance(value, BaseException) and len(value.args) == 1:
    value = value.args[0]
  text = str(value)
  return [line.strip() for line in text.splitlines() if line.strip()]


def _config_path(argv: Sequence[str]) -> str | None:
  for index, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and index + 1 < len(argv):
      return argv[index + 1]
  return None


def _override_for(name: str, argv: Sequence[str]) -> str | None:
  for arg in argv:
    flag = arg.split("=", 1)[0]
    if flag.startswith("--config.") and re.search(rf"\.{re.escape(name)}(\.|$)", flag):
      return flag
  return None


def flag_error_line(error: BaseException, argv: Sequence[str]) -> str:
  """One line for an exception raised while parsing flags or loading the config file."""
  lines = _lines(error)
  text = " ".join(lines)
  path = _config_path(argv)
  if "Failed loading config file" in text or "earlier failure to load" in text:
    if path is not None and not os.path.exists(path):
      return f"--config {path}: no such file"
    cause = next((line for line in reversed(lines) if "Error" in line or "error" in line),
                 lines[-1] if lines else "")
    return f"--config {path}: cannot load it: {cause}"
  missing = re.match(r"^'([^']+)'$", lines[0]) if lines else None
  if missing is not None:  # ml_collections: "'epochz'" then "Did you mean ...".
    name = missing.group(1)
    flag = _override_for(name, argv) or f"--config...{name}"
    hint = f"; {lines[1][0].lower()}{lines[1][1:]}" if len(lines) > 1 else ""
    return f"{flag}: the config has no field {name!r}{hint}"
  if any(type(e).__module__.startswith("absl") for e in workdir_lib.error_chain(error)):
    return text  # absl's own flag errors name the flag.
  return f"--config {path}: {text or type(error).__name__}"


def disk_full_line(error: BaseException) -> str | None:
  """One line for a full disk anywhere in `error`'s chain, or None if it is something else."""
  if not workdir_lib.is_disk_full(error):
    return None
  path = next((e.filename for e in workdir_lib.error_chain(error) if isinstance(e, OSError) and e.filename), None)
  return workdir_lib.disk_full_message(path or "the workdir")

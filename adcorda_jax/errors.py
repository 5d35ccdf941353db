"""User-facing errors.

Every error a user can cause (a bad config value, missing data, a corrupt checkpoint, a diverged
run) is raised as an `AdcordaError` subclass whose message is one line naming the offending config
key, path or value. `main.py` prints that line and exits non-zero instead of a traceback.
"""


class AdcordaError(Exception):
  """Base class for errors caused by the user's input or environment."""


class ConfigError(AdcordaError):
  """A config field has an invalid value; the message names the field."""


class DataError(AdcordaError):
  """A dataset is missing or unreadable; the message says how to get it."""


class CheckpointError(AdcordaError):
  """A checkpoint or workdir is missing, corrupt, or belongs to a different run."""


class TrainingError(AdcordaError):
  """Training cannot continue (e.g. the loss became NaN or infinite)."""

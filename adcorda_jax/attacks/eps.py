"""Names of attack budgets: the JSON key, the human label and the folder tag of an eps.

Results, folders and reports all name an eps through these, so evaluation never asks a report
module for its keys.
"""
from __future__ import annotations

# An eps within this of k/255 is shown as k/255 (config values like 8/255 are float-rounded).
_PIXEL_TOLERANCE = 1e-9


def pixel_levels(eps: float) -> int | None:
  """k when eps == k/255 (a budget of k grey levels of an 8-bit image), else None."""
  levels = round(eps * 255)
  return levels if abs(eps * 255 - levels) <= _PIXEL_TOLERANCE * 255 else None


def eps_key(eps: float) -> str:
  """The JSON key of an eps: 6 significant digits, e.g. '0.0313725'."""
  return format(float(eps), ".6g")


def eps_label(eps: float) -> str:
  """Human label: '8/255 (0.0314)' when eps is k/255, otherwise '0.05'; '0' for zero."""
  if eps == 0:
    return "0"
  levels = pixel_levels(eps)
  if levels is None:
    return format(float(eps), ".4g")
  return f"{levels}/255 ({eps:.3g})"


def eps_dir_tag(eps: float) -> str:
  """A file-name-safe tag: '8_255' for 8/255, else '0.05'."""
  levels = pixel_levels(eps)
  return f"{levels}_255" if levels is not None else eps_key(eps)

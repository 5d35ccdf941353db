"""Name -> component registries (tasks, datasets, models, ...).

Components are chosen by name from the config; an unknown name is a one-line `ConfigError` that
lists the valid names, so a typo never surfaces as a KeyError deep inside a run.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from adcorda_jax.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
  """A mapping from names to components of one kind (e.g. "model")."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator that registers `obj` under `name`; duplicate names are a programming error."""

    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._entries[name] = obj
      return obj

    return decorator

  def get(self, name: str, config_key: str | None = None) -> T:
    """Returns the component named `name`, or raises a one-line error listing valid names."""
    if name in self._entries:
      return self._entries[name]
    where = f" ({config_key})" if config_key else ""
    hint = difflib.get_close_matches(name, self._entries, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ConfigError(
        f"unknown {self.kind} {name!r}{where}; valid names: "
        f"{', '.join(self.names())}{suggestion}")

  def unregister(self, name: str) -> T:
    """Removes and returns the component named `name` (for tests that register a toy one)."""
    return self._entries.pop(name)

  def names(self) -> list[str]:
    return sorted(self._entries)

  def items(self) -> list[tuple[str, T]]:
    """(name, component) pairs in registration order."""
    return list(self._entries.items())

  def registered(self) -> list[str]:
    """The names in registration order (e.g. a default order of components)."""
    return list(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

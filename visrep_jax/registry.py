"""Name -> constructor registries with errors that list what is valid."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Iterable


class UnknownNameError(ValueError):
  """Raised for a name that is not registered; the message lists the valid names."""


class Registry:
  """A mapping from names to callables, with helpful lookup errors."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, Callable[..., Any]] = {}

  def register(self, name: str | None = None):
    def wrap(fn):
      key = name or fn.__name__
      if key in self._entries:
        raise ValueError(f"{self.kind} {key!r} registered twice")
      self._entries[key] = fn
      return fn
    return wrap

  def add(self, name: str, fn: Callable[..., Any]):
    return self.register(name)(fn)

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def get(self, name: str) -> Callable[..., Any]:
    if name not in self._entries:
      raise UnknownNameError(unknown_name_message(self.kind, name, self._entries))
    return self._entries[name]


def unknown_name_message(kind: str, name: str, valid: Iterable[str]) -> str:
  valid = sorted(valid)
  close = difflib.get_close_matches(str(name), valid, n=3)
  hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
  return f"Unknown {kind} {name!r}.{hint} Valid: {', '.join(valid)}."

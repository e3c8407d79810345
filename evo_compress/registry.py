"""Typed name -> factory registries for every extension point (operators, evaluators, ...)."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from evo_compress.exceptions import RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories. Entries may be lazy ("module:attr") so heavy back ends load late.

    Registering a name twice raises; an unknown name raises with "did you mean" and the
    list of known names (lm-eval's ``api/registry.py`` does the same).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T] | str] = {}

    def register(self, name: str, factory: Callable[..., T] | str | None = None) -> Any:
        """Register ``factory`` under ``name``; without a factory, return a decorator."""

        def _add(obj: Any) -> Any:
            if name in self._entries:
                raise RegistryError(f"{self.kind} `{name}` is already registered")
            self._entries[name] = obj
            return obj

        if factory is None:
            return _add
        return _add(factory)

    def get(self, name: str) -> Callable[..., T]:
        try:
            entry = self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None
        if isinstance(entry, str):
            module_name, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module_name), attr)
            self._entries[name] = entry
        return entry

    def unknown_message(self, name: str) -> str:
        known = sorted(self._entries)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        return f"unknown {self.kind} `{name}`{hint}; known: {', '.join(known)}"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)

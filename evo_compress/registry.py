"""Typed name -> factory registries for every extension point (operators, evaluators, ...).

A registry with an entry-point ``group`` also holds the plugins installed for it: any
distribution that declares, in its ``pyproject.toml``,

    [project.entry-points."evo_compress.evaluators"]
    my-backend = "my_package.module:MyEvaluator"

is found on the first lookup or listing (pytest's ``pytest11``, lm-eval's model registry),
without importing the plugin until its name is used.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, TypeVar

from evo_compress.exceptions import RegistryError

T = TypeVar("T")

BUILTIN = "built-in"
logger = logging.getLogger(__name__)


def _origin_of(obj: Any) -> str:
    """``built-in`` for an entry of evo_compress itself; else the module that registered it at
    run time (a benchmark's landscape, a test's double), so neither passes for a built-in.
    The test doubles of ``evo_compress.testing`` are registered at run time too."""
    module = obj.partition(":")[0] if isinstance(obj, str) else getattr(obj, "__module__", "")
    module = str(module)
    if module == "evo_compress.testing" or module.startswith("evo_compress.testing."):
        return f"registered by `{module}`"
    if module == "evo_compress" or module.startswith("evo_compress."):
        return BUILTIN
    return f"registered by `{module}`"


# Every registry with an entry-point group, by group: what `evo-compress ls` lists.
_GROUPS: dict[str, Registry[Any]] = {}


@dataclass(frozen=True)
class _Plugin:
    """An entry point not loaded yet, with the distribution that declared it."""

    entry_point: EntryPoint
    distribution: str

    def where(self) -> str:
        ep = self.entry_point
        return (
            f"entry point `{ep.name} = {ep.value}` of distribution `{self.distribution}` "
            f"(group `{ep.group}`)"
        )


def _distribution(entry_point: EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


class Registry(Generic[T]):
    """Maps names to factories. Entries may be lazy ("module:attr") so heavy back ends load late.

    Registering a name twice raises; an unknown name raises with "did you mean" and the
    list of known names (lm-eval's ``api/registry.py`` does the same). With ``group``, the
    plugins of that entry-point group join on first use; a plugin that reuses a built-in
    name is ignored, and one that fails to import fails only when its name is looked up,
    each with one line naming its distribution and entry point.

    Args:
        kind: What an entry is, in messages: "evaluator", "mutation operator".
        group: The entry-point group whose plugins join the registry
            (``evo_compress.evaluators``); None: built-in and run-time entries only.

    Raises:
        RegistryError: Another registry holds ``group`` already.
    """

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, Callable[..., T] | str | _Plugin] = {}
        self._origins: dict[str, str] = {}
        self._discovered = group is None
        if group is not None:
            if group in _GROUPS:
                raise RegistryError(f"entry-point group `{group}` has a registry already")
            _GROUPS[group] = self

    def register(self, name: str, factory: Callable[..., T] | str | None = None) -> Any:
        """Register ``factory`` under ``name``; without a factory, return a decorator.

        A built-in registered after the plugins were discovered replaces the plugin of that
        name, with the warning a plugin that reuses a built-in name gets.

        Args:
            name: The name configs use (``evaluator.name``, an operator's ``name``).
            factory: A class or factory, or a lazy ``"module:attr"`` string imported on the
                first ``get``. None: return a decorator that registers what it decorates.

        Returns:
            ``factory``, or without one a decorator that registers its argument and returns
            it unchanged.

        Raises:
            RegistryError: ``name`` is registered already (by anything but a plugin).
        """

        def _add(obj: Any) -> Any:
            if name in self._entries:
                plugin = self._entries[name]
                if not isinstance(plugin, _Plugin):
                    raise RegistryError(f"{self.kind} `{name}` is already registered")
                # A built-in registered after discovery still wins over the plugin.
                self._ignore(plugin)
            self._entries[name] = obj
            self._origins[name] = _origin_of(obj)
            return obj

        if factory is None:
            return _add
        return _add(factory)

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``, imported now if it was lazy.

        Args:
            name: A registered name, built-in or plugin.

        Returns:
            The class or factory (a lazy entry or plugin is loaded once, then kept).

        Raises:
            RegistryError: ``name`` is unknown (with "did you mean" and the known names), or
                it is a plugin that fails to import or is not callable.
            ImportError: A lazy built-in entry's module cannot be imported.
        """
        self._discover()
        try:
            entry = self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None
        if isinstance(entry, _Plugin):
            entry = self._load_plugin(name, entry)
        elif isinstance(entry, str):
            module_name, _, attr = entry.partition(":")
            entry = getattr(importlib.import_module(module_name), attr)
        self._entries[name] = entry
        return entry

    def origin(self, name: str) -> str:
        """Where the entry ``name`` comes from, without importing it.

        Args:
            name: A registered name.

        Returns:
            ``"built-in"``; the plugin distribution that provides it (name and version); or
            ``"registered by `module`"`` for an entry registered at run time outside
            evo_compress (or by ``evo_compress.testing``).

        Raises:
            RegistryError: ``name`` is unknown.
        """
        self._discover()
        if name not in self._origins:
            raise RegistryError(self.unknown_message(name))
        return self._origins[name]

    def describe(self, name: str) -> str:
        """One line about the entry ``name``, for ``evo-compress ls``.

        Args:
            name: A registered name.

        Returns:
            The first sentence of the entry's docstring (empty when it has none); the
            error's message when the name is unknown or the entry cannot load.
        """
        try:
            factory = self.get(name)
        except RegistryError as exc:
            return str(exc)
        paragraph = " ".join(
            (getattr(factory, "__doc__", None) or "").strip().split("\n\n")[0].split()
        )
        sentence, dot, _ = paragraph.partition(". ")
        return (sentence + dot.strip()).replace("``", "`")

    def unknown_message(self, name: str) -> str:
        """The message of the error for an unknown ``name``.

        Args:
            name: The name that was looked up.

        Returns:
            "unknown <kind> `name`", a "did you mean" for the closest known name, and the
            known names.
        """
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        return f"unknown {self.kind} `{name}`{hint}; known: {', '.join(known)}"

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered (plugins included; none is imported)."""
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The registered names, sorted."""
        return iter(self.names())

    def names(self) -> list[str]:
        """The registered names, sorted, the group's plugins included.

        Returns:
            Every name ``get`` accepts.
        """
        self._discover()
        return sorted(self._entries)

    # ------------------------------------------------------------------ plugins
    def _discover(self) -> None:
        """Add the group's entry points, once; none is imported here."""
        if self._discovered:
            return
        self._discovered = True
        assert self.group is not None
        for entry_point in entry_points(group=self.group):
            plugin = _Plugin(entry_point, _distribution(entry_point))
            if entry_point.name in self._entries:
                self._ignore(plugin)
                continue
            self._entries[entry_point.name] = plugin
            self._origins[entry_point.name] = plugin.distribution

    def _ignore(self, plugin: _Plugin) -> None:
        taken = self._origins.get(plugin.entry_point.name, BUILTIN)
        owner = "a built-in" if taken == BUILTIN else f"distribution `{taken}`"
        logger.warning(
            "warning: plugin %s `%s` ignored: the name is taken by %s; %s",
            self.kind,
            plugin.entry_point.name,
            owner,
            plugin.where(),
        )

    def _load_plugin(self, name: str, plugin: _Plugin) -> Callable[..., T]:
        try:
            loaded: Callable[..., T] = plugin.entry_point.load()
        except Exception as exc:  # a broken plugin is one line, and only when it is used
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise RegistryError(
                f"plugin {self.kind} `{name}` failed to load ({detail}); {plugin.where()}"
            ) from None
        if not callable(loaded):
            raise RegistryError(
                f"plugin {self.kind} `{name}` is not a class or factory; {plugin.where()}"
            )
        return loaded


def registries() -> dict[str, Registry[Any]]:
    """Every registry with an entry-point group, among the modules imported.

    Returns:
        The registries by entry-point group (``evo_compress.evaluators``, ...): what
        ``evo-compress ls`` lists.
    """
    return dict(_GROUPS)

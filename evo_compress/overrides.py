"""Command-line flags as dotted config overrides (``search.generations=7``): applied to the
config data and validated by the config model once, so a bad flag is the same one-line error
as a bad value in the file, and names the flag.

Every command that turns flags into config changes (``run``, ``resume``, ``evaluate``) goes
through ``apply_overrides``; the checks that build things run afterwards, on its result.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evo_compress.config import PopulationConfig, format_validation_error
from evo_compress.exceptions import ConfigError


@dataclass(frozen=True)
class Override:
    """One config value set from outside the file: ``path`` is dotted (``search.seed``),
    ``flag`` is what the user typed (``--seed 9``), for messages."""

    path: str
    value: Any
    flag: str

    def __post_init__(self) -> None:
        if not self.path or any(not part for part in self.path.split(".")):
            raise ConfigError(f"`{self.flag}`: `{self.path}` is not a dotted config key")

    @classmethod
    def parse(cls, text: str, flag: str = "--set") -> Override:
        """``search.generations=7``: the value is read as one YAML scalar (7 is a number,
        ``auto`` a word, ``null`` none), as it would be in the config file."""
        path, sep, raw = text.partition("=")
        if not sep:
            raise ConfigError(f"`{flag} {text}`: expected KEY=VALUE, e.g. search.generations=7")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict | list):  # one scalar per override; structures via the file
            value = raw
        return cls(path.strip(), value, f"{flag} {text}")


def apply_overrides(data: Any, overrides: Sequence[Override], source: str) -> PopulationConfig:
    """The config ``data`` (a parsed file, a stored run's config) with ``overrides`` applied,
    validated once. A problem with an overridden value names its flag; any other names
    ``source``. Cross-section checks (which build evaluators and operators) are the caller's."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of sections, got {type(data).__name__}")
    merged = copy.deepcopy(data)
    for override in overrides:
        _set(merged, override.path.split("."), override.value)
    try:
        return PopulationConfig.model_validate(merged)
    except ValidationError as exc:
        loc = ".".join(str(p) for p in exc.errors()[0]["loc"])
        flag = _blamed(loc, overrides)
        raise ConfigError(
            format_validation_error(exc, source if flag is None else f"`{flag.flag}`")
        ) from None


def cache_overrides(cache: str | Path | bool | None) -> list[Override]:
    """``--cache PATH`` (a path: that file, enabled), ``--no-cache`` (False) or nothing (None)."""
    if cache is False:
        return [Override("cache.enabled", False, "--no-cache")]
    if cache is None or cache is True:
        return []
    flag = f"--cache {cache}"
    return [Override("cache.enabled", True, flag), Override("cache.path", str(cache), flag)]


def describe(source: str, overrides: Iterable[Override]) -> str:
    """``config.yaml with --seed 9 --no-cache``: where a config came from, for messages."""
    flags = " ".join(dict.fromkeys(o.flag for o in overrides))  # --cache sets two keys
    return f"{source} with {flags}" if flags else source


def _set(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:  # `search:` with nothing under it in YAML
            child = node[part] = {}
        if not isinstance(child, dict):
            return  # the file's own value is wrong here; validation names it
        node = child
    node[parts[-1]] = value


def _blamed(loc: str, overrides: Sequence[Override]) -> Override | None:
    for override in reversed(overrides):  # the last flag setting a key wins, and is blamed
        if loc == override.path or loc.startswith(override.path + "."):
            return override
    return None

"""The exceptions evo-compress raises: one root, a few kinds the CLI turns into one-line errors."""

from __future__ import annotations


class EvoCompressError(Exception):
    """Root of every error evo-compress raises on purpose."""


class ConfigError(EvoCompressError):
    """A population config (or one of its sections) is invalid."""


class RecipeError(EvoCompressError):
    """A recipe names an unknown gene, a value out of range or a forbidden combination."""


class SearchSpaceError(EvoCompressError):
    """A search-space definition (built in or user YAML) is inconsistent."""


class EvaluationError(EvoCompressError):
    """An evaluator could not evaluate a recipe (recorded as a failed evaluation)."""


class OperatorError(EvoCompressError):
    """A variation operator is misconfigured or could not produce a child."""


class RunStoreError(EvoCompressError):
    """A run directory is missing, locked, corrupted or inconsistent with its config."""


class RegistryError(EvoCompressError):
    """A name is registered twice or looked up but unknown."""

"""Reading the YAML a user hands us (configs, recipes, search spaces) so that any file, any
bytes and any nesting end in one ``EvoCompressError`` line, never a traceback.

Duplicate mapping keys are errors (PyYAML keeps the last one silently), and documents nested
deeper than ``MAX_DEPTH`` or larger than ``MAX_NODES`` (alias bombs) are refused before any
recursive code walks them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evo_compress.exceptions import EvoCompressError

MAX_DEPTH = 64  # mappings/lists inside each other; real configs use about 6
MAX_NODES = 1_000_000  # values in one document, aliases counted each time they are used
_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping, naming it and its
    line (a merge ``<<`` may still be overridden by an explicit key)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # unhashable: the base class reports it with its line
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key `{key}`", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return f"{exc.problem}{where}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def parse_yaml(text: str, source: str, error: type[EvoCompressError] = EvoCompressError) -> Any:
    """The document in ``text``; any problem raises ``error`` as one line naming ``source``."""
    try:
        data = yaml.load(text, Loader=StrictLoader)  # a SafeLoader: no Python objects
    except yaml.YAMLError as exc:
        raise error(f"{source} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise error(f"{source} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (ValueError, OverflowError) as exc:
        # PyYAML builds ints and dates with int()/datetime(): 5,000 digits or 2020-13-45.
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{source} is not valid YAML: {reason}") from None
    check_shape(data, source, error)
    return data


def check_shape(data: Any, source: str, error: type[EvoCompressError]) -> None:
    """Refuse documents deeper than ``MAX_DEPTH`` or with more than ``MAX_NODES`` values."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise error(f"{source} is too large: more than {MAX_NODES:,} values (aliases count)")
        if isinstance(item, dict):
            children: Any = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth >= MAX_DEPTH:
            raise error(f"{source} is nested too deeply (at most {MAX_DEPTH} levels)")
        stack.extend((child, depth + 1) for child in children)


def is_file(path: Path) -> bool:
    """``path.is_file()``, but False where the name cannot be a file at all (too long, ...)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def read_text(path: Path, what: str, error: type[EvoCompressError] = EvoCompressError) -> str:
    """The UTF-8 text of ``path``; a missing, unreadable or binary file raises ``error``."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start : exc.start + 1].hex()
        raise error(
            f"{what} {path} is not UTF-8 text (byte 0x{byte} at offset {exc.start})"
        ) from None
    except ValueError as exc:  # a name with a NUL byte
        raise error(f"cannot read {what} {path!r}: {exc}") from None


def read_yaml(path: Path, what: str, error: type[EvoCompressError] = EvoCompressError) -> Any:
    """The YAML document in the file ``path`` (see ``read_text`` and ``parse_yaml``)."""
    return parse_yaml(read_text(path, what, error), str(path), error)

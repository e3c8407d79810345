"""What one subpackage uses of another is public: no module imports a private name
(``_name``) from another subpackage, so a package's private helpers can change freely."""

from __future__ import annotations

import ast
from pathlib import Path

import evo_compress

ROOT = Path(evo_compress.__file__).parent


def subpackage(module: str) -> str:
    """``evo_compress.runs.store`` -> ``runs``; a top-level module is its own package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_private_name_is_imported_across_subpackages():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT.parent).with_suffix("")
        here = subpackage(".".join(relative.parts))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level:
                continue
            if not (node.module or "").startswith("evo_compress.") or (
                subpackage(node.module or "") == here
            ):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {alias.name}")
    assert not found, "private names imported from another subpackage:\n" + "\n".join(found)

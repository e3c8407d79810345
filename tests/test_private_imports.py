"""Layout rules a linter does not check. What a module uses of another is public: no module
imports a private name (``_name``) from another module, so private helpers can change
freely. And a helper is written once: no two module-level functions share a body."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import evo_compress

ROOT = Path(evo_compress.__file__).parent


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (str(path.relative_to(ROOT.parent)), ast.parse(path.read_text(), str(path)))
        for path in sorted(ROOT.rglob("*.py"))
    ]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_imported_from_another_module():
    found = [
        f"{where}:{node.lineno} {alias.name} from {node.module}"
        for where, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and not node.level
        and (node.module or "").startswith("evo_compress")
        for alias in node.names
        if _private(alias.name)
    ]
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def _body(function: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The function's statements (its docstring left out), as the AST shows them."""
    body = function.body
    first = body[0] if body else None
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        body = body[1:]
    return ast.dump(ast.Module(body=body, type_ignores=[]), annotate_fields=False)


def test_no_helper_is_written_twice():
    # Four copies of a clipping helper had drifted to three different ellipses before they
    # became text.clip. One-line bodies (``return x``) are too small to count as a copy.
    by_body: dict[str, list[str]] = defaultdict(list)
    for where, tree in _modules():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = _body(node)
                if len(body) > 60:
                    by_body[body].append(f"{where}:{node.name}")
    copies = [places for places in by_body.values() if len(places) > 1]
    assert not copies, f"the same function body in several places: {copies}"

"""mkdocs hooks: the README and BENCHMARKS.md, which live at the repository root for GitHub,
become pages of the site, so that the links of docs/ to them are checked like any other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

# Root file -> its page in the site.
_PAGES = {"README.md": "readme.md", "BENCHMARKS.md": "benchmarks.md"}


def _relink(markdown: str, prefix: str) -> str:
    """Links written from ``prefix`` (the root: "", docs/: "../") retargeted to the site."""
    for root, page in _PAGES.items():
        markdown = markdown.replace(f"]({prefix}{root}", f"]({page}")
    return markdown


def on_files(files: Files, config: Any) -> Files:
    root = Path(config["config_file_path"]).parent
    for name, page in _PAGES.items():
        text = (root / name).read_text(encoding="utf-8")
        # The root's links into docs/ are links between pages of the site.
        text = re.sub(r"\]\(docs/", "](", _relink(text, ""))
        files.append(File.generated(config, page, content=text))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    return _relink(markdown, "../")

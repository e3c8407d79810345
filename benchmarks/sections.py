"""BENCHMARKS.md is shared by several benchmarks: each rewrites only its own marked section."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT = REPO_ROOT / "BENCHMARKS.md"
TITLE = (
    "# Benchmarks\n\n"
    "Each section says when, where and how it was measured; `make bench` reruns them.\n"
)


def write_section(name: str, body: str, path: Path = OUTPUT) -> None:
    """Replace the section between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` (appended
    when absent), leaving the other sections as they are."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else TITLE
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = before + block + ("\n" + after if after else "")
    else:
        if not text.lstrip().startswith("# Benchmarks"):
            text = TITLE  # a file from before sections existed: start over
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)

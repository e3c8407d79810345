"""Text from outside the program (an LLM's reply, a provider's error message) made safe to
store (``encodable``) and to show in a terminal (``terminal_safe``)."""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"

# A lone UTF-16 surrogate: valid in a Python str (JSON's "\ud800" decodes to one), but no
# UTF-8 encoder (SQLite, a file, a terminal) accepts it.
_SURROGATE = re.compile("[\ud800-\udfff]")
# What a terminal acts on instead of showing: ESC sequences (CSI, OSC, DCS/SOS/PM/APC strings,
# two-character escapes), then any other C0 control but tab and newline, DEL and C1 controls,
# and the bidirectional overrides that make shown text read differently from what it is.
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]?"
    r"|[\]PX^_][^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|[ -/]*[0-~]?)"
)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def encodable(text: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, so UTF-8 can encode it."""
    return _SURROGATE.sub(REPLACEMENT, text)


def terminal_safe(text: str) -> str:
    """``text`` as a terminal may print it: control characters and escape sequences removed
    (tab and newline kept), lone surrogates replaced."""
    return _CONTROL.sub("", _ESCAPE_SEQUENCE.sub("", encodable(text)))


def clip(text: str, limit: int, *, ellipsis: str = "…", flatten: bool = True) -> str:
    """``text`` cut to at most ``limit`` characters, ending in ``ellipsis`` when cut.

    Args:
        text: What to shorten.
        limit: The longest result, ellipsis included.
        ellipsis: What marks a cut (``"..."`` where the text goes to a prompt or a log that
            must stay ASCII).
        flatten: Collapse every run of whitespace, newlines included, to one space first.

    Returns:
        The text itself when it fits, else its start and the ellipsis.
    """
    text = " ".join(str(text).split()) if flatten else text
    return text if len(text) <= limit else text[: limit - len(ellipsis)] + ellipsis


def format_value(value: object) -> str:
    """A value as a table cell shows it: a float to six significant digits, None as ``-``."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)

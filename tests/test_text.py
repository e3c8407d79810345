"""Outside text made safe to store and to show in a terminal."""

from __future__ import annotations

import pytest

from evo_compress.text import clip, encodable, terminal_safe


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[2J\x1b[1;31mred\x1b[0m", "red"),  # CSI: clear screen, colours
        ("\x1b]0;title\x07after", "after"),  # OSC ended by BEL: the window title
        ("\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "link"),  # OSC 8 hyperlink, ST ends
        ("\x1bPq#0;2;0;0;0\x1b\\img", "img"),  # DCS (sixel)
        ("a\x1bcb", "ab"),  # RIS: reset the terminal
        ("\x9b2Jx\x9d0;t\x9c", "2Jx0;t"),  # C1 controls go, their plain arguments stay
        ("tab\tand\nnewline\r\x00\x08\x7f", "tab\tand\nnewline"),
        ("abc\u202edcba", "abcdcba"),  # a right-to-left override
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("plain ünïcødé 日本 🙂 [/] [bold]", "plain ünïcødé 日本 🙂 [/] [bold]"),
    ],
)
def test_terminal_safe_strips_what_a_terminal_acts_on(raw, shown):
    assert terminal_safe(raw) == shown
    terminal_safe(raw).encode("utf-8")


def test_encodable_replaces_lone_surrogates_only():
    assert encodable("a\udfffb\ud83d") == "a\ufffdb\ufffd"
    assert encodable("ok 🙂 \x1b[2J") == "ok 🙂 \x1b[2J"


def test_clip_keeps_short_text_and_cuts_long_text_to_the_limit() -> None:
    assert clip("a  b\nc", 10) == "a b c"
    assert clip("a  b\nc", 10, flatten=False) == "a  b\nc"
    assert clip("x" * 20, 10) == "x" * 9 + "…"
    cut = clip("x" * 20, 10, ellipsis="...")
    assert cut == "x" * 7 + "..." and len(cut) == 10

"""Ctrl-C as the command line promises it: one line on stderr and exit code 130 at any
moment, imports included, never a traceback.

Light on purpose (standard library only): the entry points install it before the heavy
imports. Outside a command's body nothing of the user's is open, so Ctrl-C ends the process
at once; inside, ``raising()`` turns it back into ``KeyboardInterrupt`` so a search can
checkpoint and say how to resume.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import FrameType

EXIT_CODE = 130  # 128 + SIGINT, what shells report for a Ctrl-C


def _exit_now(signum: int, frame: FrameType | None) -> None:
    for stream in (sys.stdout, sys.stderr):
        # A write the signal interrupted cannot be finished: that output is lost anyway.
        with suppress(Exception):
            stream.flush()
    try:
        os.write(2, b"interrupted\n")
    finally:
        os._exit(EXIT_CODE)


def exit_on_interrupt() -> None:
    """From now on Ctrl-C ends this process at once with one line and exit code 130."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_now)


@contextmanager
def raising() -> Iterator[None]:
    """Inside, Ctrl-C raises ``KeyboardInterrupt`` (for the caller to clean up and report);
    after, it ends the process at once again. A no-op unless ``exit_on_interrupt`` ran."""
    if signal.getsignal(signal.SIGINT) is not _exit_now:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, _exit_now)

"""Keep the import-time chatter of torchao, bitsandbytes and torch off the terminal."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# The descriptors are the process's: two threads redirecting at once (parallel workers)
# would restore each other's redirection and leave the terminal silenced.
_LOCK = threading.RLock()


@contextmanager
def quiet_output() -> Iterator[None]:
    """Send file descriptors 1 and 2 to /dev/null for the duration (C extensions write there
    directly, so redirecting ``sys.stdout`` is not enough)."""
    with _LOCK:
        saved = os.dup(1), os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, 1)
            os.dup2(null, 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (*saved, null):
                os.close(fd)

"""The writer lock of a run directory: one process writes a run at a time.

``flock`` on the run's ``.lock`` file, which holds the writer's pid so that a second process
can say who has it. The kernel releases the lock when the process dies, even by ``kill -9``.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import suppress
from pathlib import Path

from evo_compress.exceptions import RunStoreError

LOCK_NAME = ".lock"


def take_lock(run_dir: Path) -> int:
    """Take the writer lock of ``run_dir``; returns its descriptor, which ``release_lock``
    closes. A lock another process holds raises at once, naming that process.

    Raises:
        RunStoreError: the lock is held by another process, or cannot be made.
    """
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunStoreError(f"cannot lock the run in {run_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunStoreError(
            f"{run_dir} is in use by another evo-compress process (pid {holder}); "
            "wait for it to finish or stop it first"
        ) from None
    with suppress(OSError):  # the pid only names the holder to others; a full disk may refuse
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    return fd


def release_lock(fd: int) -> None:
    """Release the lock ``take_lock`` returned: closing the descriptor releases the flock."""
    os.close(fd)

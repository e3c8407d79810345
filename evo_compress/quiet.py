"""Other libraries' notices, kept off a search's terminal.

On a CPU-only machine, importing torchao logs one ``Failed to load .../_C_*.so`` warning per
CUDA kernel library it ships, and torch's pytree module logs a deprecation warning
(``W1207 ... torch/utils/_pytree.py:630] <enum ...> is an Enum subclass ...``) for each enum
that torchao registers. Both go through Python ``logging``, both are about the libraries'
own internals, and neither is anything a user of evo-compress can act on. torch's C++ side
(c10 logging, the same ``W....`` prefix) is configured by ``TORCH_CPP_LOG_LEVEL``.

``quiet_libraries`` raises those loggers to ``ERROR`` and sets the C++ level before torch is
imported; the CLI calls it first thing, unless ``--debug`` asks to see everything. Worker
processes inherit the environment, and what they print anyway goes to their log.
"""

from __future__ import annotations

import logging
import os

# Loggers whose warnings describe the library's own build, not the user's run.
LIBRARY_LOGGERS: tuple[str, ...] = ("torchao", "torch.utils._pytree")
# Read by torch when it is imported (c10 logging): warnings from its C++ code.
LIBRARY_ENV: dict[str, str] = {"TORCH_CPP_LOG_LEVEL": "ERROR"}


def quiet_libraries() -> None:
    """Raise third-party loggers that only announce their own internals to ``ERROR``, and
    set the environment that quiets their C++ code (a value the user set is kept)."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for key, value in LIBRARY_ENV.items():
        os.environ.setdefault(key, value)


__all__ = ["LIBRARY_ENV", "LIBRARY_LOGGERS", "quiet_libraries"]
